"""One pipeline for every provider: a recipe that starts from a transformers model and takes its
roles from the offline world, with a local model from a folder in the ensemble; and recipes
whose roles or layout cannot work, refused before any stage with the key named."""

from __future__ import annotations

import json

import pytest

from dalign.cli import main
from dalign.config import ConfigError
from dalign.manifest import config_hash
from dalign.pretrain import build_model
from dalign.recipe import load_recipe
from dalign.run import plan
from test_dpo import TINY

RECIPE = """\
name: mixed
run_dir: {run_dir}
start: {start}
dialogues: {{n_dialogues: 24, chunk_size: 12}}
sft: {{max_steps: 4, per_device_batch_size: 4, max_length: 128}}
completions:
  n_prompts: 16
  per_prompt: 2
  max_new_tokens: 8
  members:
    - {{name: folder, model: {other}}}
    - {{name: dsft, model: sft}}
    - {{name: world-erratic, world: {{error: 0.6}}}}
dpo: {{max_steps: 2, per_device_batch_size: 4, max_length: 128}}
variants: [{{name: main}}, {{name: nosft, start: start}}]
evaluate: {{questions_per_category: 1, max_new_tokens: 8, pass_k: 2, win_rate_instructions: 8}}
"""


@pytest.fixture
def mixed(tmp_path, world_tokenizer, one_thread):
    for name, seed in (("start", 0), ("other", 1)):
        build_model(TINY, world_tokenizer, seed=seed).save_pretrained(tmp_path / name)
        world_tokenizer.save_pretrained(tmp_path / name)
    path = tmp_path / "mixed.yaml"
    path.write_text(RECIPE.format(run_dir=tmp_path / "run", start=tmp_path / "start", other=tmp_path / "other"))
    return path


def test_world_roles_serve_a_recipe_on_a_transformers_model(mixed, tmp_path, capsys):
    assert list(plan(load_recipe(mixed))) == ["dialogues", "sft", "completions", "ratings", "pairs", "dpo-main",
                                              "dpo-nosft", "evaluate"]  # no base stage: the start is a model
    assert main(["run", str(mixed)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    dialogue = json.loads((run / "dialogues" / "dialogues.jsonl").read_text().splitlines()[0])
    assert dialogue["teacher"] == "world-teacher" and dialogue["user_simulator"] == "world-user"
    completions = json.loads((run / "completions" / "manifest.json").read_text())
    assert set(completions["completions_per_member"]) == {"folder", "dsft", "world-erratic"}
    assert set(completions["generation"]) == {"folder", "dsft"}  # the two local models
    ratings = [json.loads(x) for x in (run / "ratings" / "ratings.jsonl").read_text().splitlines()]
    assert all(c["score"] is not None for r in ratings for c in r["completions"])  # the world's rater read them all
    evaluation = json.loads((run / "evaluate" / "manifest.json").read_text())
    assert evaluation["judge"] == "world-judge" and evaluation["reference"] == "sft"
    results = evaluation["results"]
    assert list(results) == ["start", "sft", "dpo-main", "dpo-nosft"]
    for label, r in results.items():  # the world's judge tells right from wrong: accuracy and pass@k too
        assert 1 <= r["score"] <= 10 and 0 <= r["greedy_accuracy"] <= 1 and 0 <= r["pass_at_k"] <= 1, label
    assert "win_rate" not in results["sft"] and all("win_rate" in results[k] for k in ("start", "dpo-main"))
    dpo_nosft = json.loads((run / "dpo-nosft" / "manifest.json").read_text())
    assert dpo_nosft["reference"] == str(tmp_path / "start")
    out = capsys.readouterr().out
    assert "dDPO on the starting model, no SFT" in (run / "report" / "report.md").read_text() and "| start |" in out


@pytest.mark.parametrize("overrides, key", [
    (["roles.judge={}"], "roles.judge: needs exactly one source"),
    (["roles.rater={world: {}, openai: {base_url: 'http://127.0.0.1:9/v1', model: m}}"], "roles.rater: needs exactly one"),
    (["completions.members=[{name: a}, {name: b, model: sft}]"], "member 'a' needs exactly one source"),
    (["completions.members=[{name: a, model: sft, world: {}}, {name: b, model: sft}]"], "member 'a' needs exactly one"),
    (["start=m", "completions.members=[{name: a, model: base}, {name: b, model: sft}]"],
     "completions.members[0].model: 'base' is the world's pretrained model"),
    (["skip=[sft]", "variants=[{name: a, start: start}]"], "completions.members[0].model: 'sft' names this run's dSFT"),
    (["roles.judge.model=sft", "skip=[sft]", "pairs.source={path: p}", "pairs.held_out={path: p}",
      "variants=[{name: a, start: start}]"], "roles.judge.model: 'sft'"),
])
def test_a_role_with_two_sources_or_none_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [f"run_dir={tmp_path / 'run'}", *overrides])
    assert key in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_recipe_in_the_earlier_layout_says_where_each_key_moved(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("teacher: {ramble: 0.5}\nreal:\n  model: smollm2-135m-instruct\n  skip: [sft]\n"
                   "  pairs: {path: p.jsonl}\n  judge: {base_url: 'http://x/v1', model: gpt-4}\n"
                   "completions:\n  members: [{name: w, flaws: {error: 0.5}}]\n")
    assert main(["run", str(old)]) == 2
    err = capsys.readouterr().err
    for moved in ("teacher moved to roles.teacher.world", "real.model moved to start.model", "real.skip moved to skip",
                  "real.pairs moved to pairs.source", "real.judge moved to roles.judge.openai and roles.comparer.openai",
                  "completions.members[0].flaws moved to completions.members[0].world"):
        assert moved in err, moved
    assert str(old) in err


def test_each_stage_hash_covers_exactly_the_roles_it_reads():
    server = "{openai: {base_url: 'http://127.0.0.1:9/v1', model: m}}"
    before = plan(load_recipe(None))

    def changed(*overrides):
        after = plan(load_recipe(None, list(overrides)))
        return [s for s in before if config_hash(before[s][1]) != config_hash(after[s][1])]

    assert changed(f"roles.judge={server}") == ["evaluate"]  # a new judge redoes no training
    assert changed(f"roles.comparer={server}") == ["evaluate"]
    assert changed(f"roles.rater={server}") == ["ratings"]
    assert changed("roles.teacher.world.ramble=0.1") == ["dialogues"]
    assert changed("dpo.beta=0.2") == ["dpo-1ep", "dpo-3ep", "dpo-base", "evaluate"]  # the reward accuracy reads beta
    assert changed("sft.learning_rate=1.0e-3") == ["sft", "dpo-sft2"]  # dSFT-2 trains with the sft section
