"""Hugging Face cards on the micro recipe's run (tests/conftest.py's micro_run): every model folder
has a model card and every dataset stage a dataset card that huggingface_hub parses, `datasets`
reads each stage folder through its card's configs with the manifest's counts, a model card's
evaluation is the evaluate manifest's, and a rerun writes the same bytes (missing cards included)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
from huggingface_hub import DatasetCard, ModelCard

from dalign.cards import hub_id, write_text
from dalign.cli import main
from dalign.recipe import load_recipe
from dalign.run import run_stage

MODELS = {"base": None, "sft": ["dialogues"], "dpo-main": ["pairs"], "dpo-nosft": ["pairs"]}  # stage: datasets
DATASETS = ("dialogues", "completions", "ratings", "pairs")


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def expected_rows(run_dir: Path, stage: str) -> dict[str, tuple[str, int]]:
    """Each split's file and its rows, as the stage's manifest counts them."""
    m = manifest(run_dir, stage)
    if stage == "pairs":
        return {split: (f"{split}.jsonl", m[split]) for split in ("train", "test", "dev")}
    kept = m["rows"]["kept"] + (m["rows"]["dropped"]["rating_failed"] if stage == "ratings" else 0)  # failed rows stay
    return {"train": (f"{stage}.jsonl", kept)}


def cards(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("README.md"))}


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()


def test_each_model_folder_has_a_model_card_the_hub_parses(micro_run):
    _, run_dir, code, _, err = micro_run
    assert code == 0, err
    for stage, trained_on in MODELS.items():
        card = ModelCard.load(run_dir / stage / "model" / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation", stage
        assert "dalign" in data["tags"] and ("dpo" if stage.startswith("dpo") else stage.replace("base", "pretraining")) \
            in data["tags"], stage
        assert data["license"] == "other"
        assert "base_model" not in data  # the world's base model has no hub id
        assert data.get("datasets") == trained_on, stage
        assert f"# micro / {stage}" in card.text and "AutoModelForCausalLM.from_pretrained(path)" in card.text
        assert f"dalign chat {stage}/model" in card.text
        assert manifest(run_dir, stage)["code_version"] in card.text and str(run_dir) not in card.content
    sft = ModelCard.load(run_dir / "sft" / "model" / "README.md").text
    config = manifest(run_dir, "sft")["config"]["sft"]
    assert f"| learning rate | {config['learning_rate']:g} |" in sft and "| max steps | 4 |" in sft
    assert "| global batch | 4 (" in sft and "| LoRA | no: every weight trained |" in sft
    assert "teacher: world-teacher (the offline world)" in sft
    dpo = ModelCard.load(run_dir / "dpo-main" / "model" / "README.md").text
    assert "| beta | 0.1 |" in dpo and "| learning rate | 0.0001 |" in dpo and "rater: world-rater" in dpo
    assert not list(run_dir.glob("*/checkpoints/**/README.md"))  # only the saved models have cards


def test_each_dataset_reads_with_datasets_as_its_card_and_manifest_say(micro_run, tmp_path):
    _, run_dir, code, _, err = micro_run
    assert code == 0, err
    for stage in DATASETS:
        folder = run_dir / stage
        before = sorted(p.name for p in folder.iterdir())
        data = DatasetCard.load(folder / "README.md").data.to_dict()
        assert data["license"] == "other" and "dalign" in data["tags"] and data["task_categories"] == ["text-generation"]
        assert data["size_categories"] == ["n<1K"]
        files = {f["split"]: f["path"] for f in data["configs"][0]["data_files"]}
        rows = expected_rows(run_dir, stage)
        # A split with no rows stays out of configs: datasets cannot load an empty file.
        assert files == {split: name for split, (name, n) in rows.items() if n > 0}, stage
        for split, (name, n) in rows.items():
            lines = (folder / name).read_text().splitlines()
            assert len(lines) == n, (stage, split)
            if n:
                assert (folder / files[split]).is_file()
                loaded = datasets.load_dataset("json", data_files=str(folder / name), split="train",
                                               cache_dir=str(tmp_path / "cache"))
                assert loaded.num_rows == n, (stage, split)
                assert loaded[0] == {k: json.loads(lines[0]).get(k) for k in loaded.column_names}
        through_card = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
        assert {s: d.num_rows for s, d in through_card.items()} == {s: n for s, (_, n) in rows.items() if n}, stage
        assert sorted(p.name for p in folder.iterdir()) == before  # loading wrote nothing into the stage folder
    assert manifest(run_dir, "pairs")["dev"] == 0 and "Left out of `configs`" in (run_dir / "pairs" / "README.md").read_text()


def test_a_model_cards_evaluation_is_the_evaluate_manifests(micro_run):
    _, run_dir, code, _, err = micro_run
    assert code == 0, err
    evaluation = manifest(run_dir, "evaluate")
    for label, result in evaluation["results"].items():
        card = ModelCard.load(run_dir / label / "model" / "README.md")
        found = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
        expected = {("mt_bench", "mt_bench_score"): result["score"],
                    **{("mt_bench", k): result[k] for k in ("first_turn_correct", "greedy_accuracy", "pass_at_k")}}
        if "win_rate" in result:  # every model but the reference (sft)
            expected[("win_rate", "win_rate")] = result["win_rate"]["win_rate"]
            if result["win_rate"]["length_controlled_win_rate"] is not None:
                expected[("win_rate", "length_controlled_win_rate")] = result["win_rate"]["length_controlled_win_rate"]
        if "reward_accuracy" in result:  # the dDPO variants
            expected[("reward_accuracy", "reward_accuracy")] = result["reward_accuracy"]["reward_accuracy"]
        assert found == {k: v for k, v in expected.items() if math.isfinite(v)}, label
        assert all(r.dataset_split == "test" for r in card.data.eval_results)
        assert f"| MT-Bench-style score (1-10, 95% CI) | {result['score']:.2f} ±" in card.text, label
        assert "From stage `evaluate` (test split; judge world-judge, comparer world-comparer)" in card.text
    assert set(evaluation["results"]) == set(MODELS)
    assert "reward_accuracy" in evaluation["results"]["dpo-main"] and "win_rate" not in evaluation["results"]["sft"]


def test_a_rerun_leaves_the_cards_byte_identical_and_writes_missing_ones(micro_run, tmp_path, capsys):
    """In a copy of the run (another run directory: a card names none), with some cards gone as in a
    run made before cards or killed before its card, and one out of date."""
    path, run_dir, code, _, err = micro_run
    assert code == 0, err
    original = cards(run_dir)
    assert set(original) == {f"{s}/model/README.md" for s in MODELS} | {f"{s}/README.md" for s in DATASETS}
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for gone in ("sft/model/README.md", "pairs/README.md"):
        (copy / gone).unlink()
    stale = copy / "dpo-main" / "model" / "README.md"
    stale.write_text(stale.read_text().split("## Evaluation")[0])  # written before the evaluation finished
    (copy / "ratings" / ".README.md.tmp").write_text("half")  # killed while writing
    kept = {name: (copy / name).stat().st_mtime_ns for name in ("base/model/README.md", "dialogues/README.md")}
    capsys.readouterr()
    assert main(["run", str(path), f"run_dir={copy}"]) == 0
    assert capsys.readouterr().out.count("skipped") == len(MODELS) + len(DATASETS) + 1  # and evaluate
    assert cards(copy) == original
    assert {name: (copy / name).stat().st_mtime_ns for name in kept} == kept  # unchanged cards are not rewritten
    assert not list(copy.rglob("*.tmp"))
    assert main(["run", str(path), f"run_dir={copy}"]) == 0
    assert cards(copy) == original


def test_a_lora_stage_gets_a_peft_card_for_its_adapter(micro_run, tmp_path, one_thread):
    path, run_dir, code, _, err = micro_run
    assert code == 0, err
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("evaluate", "dpo-*", "report"))
    recipe = load_recipe(path, [f"run_dir={copy}", "dpo.lora={rank: 4, alpha: 8, dropout: 0.0}"])
    assert run_stage(recipe, "dpo-main")["status"] == "complete"
    adapter = ModelCard.load(copy / "dpo-main" / "adapter" / "README.md")  # replaces the one PEFT writes
    data = adapter.data.to_dict()
    assert data["library_name"] == "peft" and {"dalign", "dpo", "lora", "peft"} <= set(data["tags"])
    assert "base_model" not in data and data["datasets"] == ["pairs"]  # it applies to this run's sft: no hub id
    assert "PeftModel.from_pretrained" in adapter.text and "this run's model of stage `sft`" in adapter.text
    model = ModelCard.load(copy / "dpo-main" / "model" / "README.md")
    assert model.data.library_name == "transformers" and "lora" in model.data.tags
    assert "| LoRA | rank 4, alpha 8, dropout 0, on all-linear; merged into model/ |" in model.text
    assert "Not evaluated yet" in model.text and str(copy) not in model.content


def test_base_model_is_a_hub_id_or_left_out(tmp_path, monkeypatch):
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the built-in's source
    assert hub_id(str(tmp_path)) is None and hub_id("./models/start") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub_id("org/model") is None  # a folder that looks like a hub id is a folder


def test_a_card_is_written_whole_and_only_when_it_changes(tmp_path):
    card = tmp_path / "README.md"
    (tmp_path / ".README.md.tmp").write_text("left by a killed run")
    write_text(card, "one\n")
    assert card.read_text() == "one\n" and [p.name for p in tmp_path.iterdir()] == ["README.md"]
    before = card.stat().st_mtime_ns
    write_text(card, "one\n")
    assert card.stat().st_mtime_ns == before
    write_text(card, "two\n")
    assert card.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["README.md"]
