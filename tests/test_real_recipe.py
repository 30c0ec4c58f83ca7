"""A recipe that starts from a model, run whole on a tiny one: pairs from a dataset file with one
part held out, dSFT skipped, dDPO with LoRA from the start, held-out reward accuracy (the
MT-Bench-style score and the win rate skipped); a rerun skips every stage."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from dalign.cli import main
from dalign.config import ConfigError
from dalign.data import write_rows
from dalign.pretrain import build_model
from dalign.recipe import load_recipe
from dalign.run import run_recipe as run
from test_dpo import TINY, world_pairs
from test_mc import ARC_FILES, needs_arc, needs_lm_eval

pytest.importorskip("peft")


@pytest.fixture
def recipe(tmp_path, world_tokenizer, one_thread):
    build_model(TINY, world_tokenizer, seed=0).save_pretrained(tmp_path / "start")
    world_tokenizer.save_pretrained(tmp_path / "start")
    # The source file in ultrafeedback_binarized's plain-string form, as the real sample has it.
    # Rejected is chosen padded with a stock sign-off: a habit a tiny random model can learn to
    # avoid from some pairs and show on others (right-versus-wrong answers need knowledge it lacks).
    rows = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["chosen"][0]["content"] + " I hope this helps you.", "score_chosen": 9.0,
             "score_rejected": 3.0} for r in world_pairs(96)]
    write_rows(tmp_path / "uf.jsonl", rows)
    src = str(tmp_path / "uf.jsonl")
    return load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"start.model={tmp_path / 'start'}", "skip=[sft]",
                              f"pairs.source={{path: {src}, limit: 64}}", f"pairs.held_out={{path: {src}, offset: 64}}",
                              "variants=[{name: main, start: start}]", "evaluate.skip=[mt_bench, win_rate]",
                              "dpo.max_steps=30", "dpo.learning_rate=2e-2", "dpo.beta=0.5", "dpo.lora={rank: 4, alpha: 8}"])


def test_a_real_recipe_trains_and_reports_held_out_reward_accuracy(recipe, tmp_path):
    out = run(recipe)
    assert list(out) == ["pairs", "dpo-main", "evaluate"]
    assert out["evaluate"]["rows"] == {} and "score" not in out["evaluate"]["results"]["start"]  # both skipped
    assert out["pairs"]["train"]["kept"] == 64 and out["pairs"]["test"]["kept"] == 32
    held = out["evaluate"]["results"]["dpo-main"]["reward_accuracy"]
    assert held["pairs"] == 32 and 0 <= held["reward_accuracy"] <= 1 and held["ci95"] >= 0
    # The pairs it never saw: the padded answer is the rejected one, learned from the other 64.
    assert held["reward_accuracy"] >= 0.9
    assert json.loads((tmp_path / "run" / "evaluate" / "reward_accuracy_dpo-main.json").read_text()) == held
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "dpo-main" / "model")  # plain transformers
    # The report of a run with no MT-Bench-style grades: the reward accuracy, no radar chart.
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | start | none (starting model) | - |" in report
    assert f"dDPO on the starting model, no SFT (1 epoch) | - | - | - | {held['reward_accuracy']:.1%}" in report
    again = run(recipe)  # every stage complete: nothing recomputed
    assert again["evaluate"]["finished"] == out["evaluate"]["finished"]


def test_a_variant_from_sft_with_sft_skipped_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"variants\[0\].start.*skip has sft"):
        load_recipe(None, [f"run_dir={tmp_path}", "start.model=x", "skip=[sft]"])


@needs_lm_eval
@needs_arc
def test_the_evaluation_scores_multiple_choice_on_every_model(recipe, tmp_path):
    mc = {"tasks": ["arc_challenge"], "num_fewshot": {"arc_challenge": 0}, "limit": 3,
          "data": {"arc_challenge": {"test": str(ARC_FILES["test"])}}}
    out = run(recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"mc": mc}),
                                        "dpo": recipe.dpo.model_copy(update={"max_steps": 2})}))
    results = out["evaluate"]["results"]
    for label in ("start", "dpo-main"):  # before and after, scored by lm-eval on the same 3 questions
        arc = results[label]["mc"]["arc_challenge"]
        assert arc["n"] == 3 and 0 <= arc["acc"] <= 1, label
    assert (tmp_path / "run" / "evaluate" / "mc_dpo-main" / "mc.json").exists()
