"""The ablation on a micro recipe: seeds from one shared base model, the dSFT-2 variant, a larger
student, dev and test splits drawn apart from each other and from every training prompt, and the
paper report's figures over seeds equal to the runs' own."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path

import pytest
import torch

from dalign.cli import main
from dalign.data import read_rows
from dalign.recipe import load_recipe
from dalign.run import plan

RECIPE = """\
name: micro-ablation
run_dir: {run_dir}
seeds: [0, 1]
students: [{{name: big, model: {{hidden_size: 64, layers: 1, heads: 2, intermediate_size: 128, max_position: 128,
                                 vocab_size: 600}}}}]
base: {{corpus_documents: 300, max_steps: 6, per_device_batch_size: 4, max_length: 64, log_every: 2,
        model: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, max_position: 128, vocab_size: 600}}}}
dialogues: {{n_dialogues: 40, chunk_size: 16}}
sft: {{max_steps: 4, per_device_batch_size: 4, max_length: 128, log_every: 1}}
completions: {{n_prompts: 24, chunk_size: 8, max_new_tokens: 8}}
pairs: {{test_fraction: 0.25, dev_fraction: 0.25}}
dpo: {{per_device_batch_size: 4, max_length: 128, log_every: 1}}
variants: [{{name: 1ep, epochs: 1}}, {{name: 2ep, epochs: 2}}, {{name: sft2, method: sft, epochs: 1}},
           {{name: nosft, start: base, learning_rate: 1.0e-3}}]
evaluate: {{questions_per_category: 1, max_new_tokens: 8, pass_k: 2, win_rate_instructions: 8, split: {split}}}
"""


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """The micro ablation through the CLI: test split (with the report), then the dev split."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ablation")
    run_dir = folder / "run"
    codes = {}
    for split in ("test", "dev"):
        path = folder / f"{split}.yaml"
        path.write_text(RECIPE.format(run_dir=run_dir, split=split))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes[split] = (main(["run", str(path)]), out.getvalue(), err.getvalue())
    return run_dir, codes


def test_every_seed_runs_after_one_shared_base_model(ablation):
    run_dir, codes = ablation
    assert codes["test"][0] == 0, codes["test"][2]
    assert codes["dev"][0] == 0, codes["dev"][2]
    assert (run_dir / "base" / "manifest.json").exists() and (run_dir / "base-big" / "manifest.json").exists()
    for seed in (0, 1):
        assert not (run_dir / f"seed-{seed}" / "base").exists()  # shared, not copied
        sft = json.loads((run_dir / f"seed-{seed}" / "sft" / "manifest.json").read_text())
        assert sft["inputs"]["base"] == str(run_dir / "base")
        assert sft["config"]["sft"]["seed"] == seed and sft["seeds"]["data_order"] == seed
    dialogues = [read_rows(run_dir / f"seed-{s}" / "dialogues" / "dialogues.jsonl") for s in (0, 1)]
    assert [r["messages"] for r in dialogues[0]] != [r["messages"] for r in dialogues[1]]
    # The dev evaluation ran in its own folder and left the test one as it was.
    assert "report: " not in codes["dev"][1]
    assert (run_dir / "seed-1" / "evaluate-dev" / "manifest.json").exists()
    assert json.loads((run_dir / "seed-1" / "evaluate" / "manifest.json").read_text())["split"] == "test"


def _first_turns(path: Path) -> set[str]:
    return {a["turns"][0] for a in json.loads(path.read_text())["answers"]}


def _instructions(folder: Path) -> set[str]:
    return {i["instruction"] for p in folder.glob("win_rate_*.json") for i in json.loads(p.read_text())["items"]}


def test_dev_and_test_prompts_and_every_training_prompt_are_disjoint(ablation):
    run_dir, _ = ablation
    for seed in (0, 1):
        run = run_dir / f"seed-{seed}"
        training = {r["messages"][0]["content"] for r in read_rows(run / "dialogues" / "dialogues.jsonl")}
        training |= {r["prompt"][-1]["content"] for r in read_rows(run / "completions" / "completions.jsonl")}
        held = {split: (_first_turns(run / folder / "sft.json"), _instructions(run / folder))
                for split, folder in (("test", "evaluate"), ("dev", "evaluate-dev"))}
        sets = [training, *held["test"], *held["dev"]]
        assert all(sets[1:])
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                assert not sets[i] & sets[j], (i, j, sets[i] & sets[j])
        pairs = {s: {r["prompt_id"] for r in read_rows(run / "pairs" / f"{s}.jsonl")} for s in ("train", "dev", "test")}
        assert all(pairs.values()) and not (pairs["train"] & pairs["dev"] or pairs["train"] & pairs["test"]
                                            or pairs["dev"] & pairs["test"])


def test_dsft2_trains_on_the_chosen_answers_from_the_dsft_model(ablation):
    run = ablation[0] / "seed-0"
    manifest = json.loads((run / "dpo-sft2" / "manifest.json").read_text())
    train = read_rows(run / "pairs" / "train.jsonl")
    rows = read_rows(run / "dpo-sft2" / "chosen_dialogues.jsonl")
    assert [r["messages"] for r in rows] == [p["prompt"] + p["chosen"] for p in train]
    assert manifest["method"] == "sft" and manifest["reference"] == str(run / "sft" / "model")
    assert manifest["rows"]["kept"] + sum(manifest["rows"]["dropped"].values()) == len(train)
    nosft = json.loads((run / "dpo-nosft" / "manifest.json").read_text())
    assert nosft["config"]["variant"]["learning_rate"] == 1e-3  # a variant's own learning rate is the one used
    assert json.loads((run / "dpo-nosft" / "metrics.jsonl").read_text().splitlines()[0])["lr"] <= 1e-3


def test_the_larger_student_is_dsft_only_on_the_same_dialogues(ablation):
    run_dir = ablation[0]
    small, big = (json.loads((run_dir / b / "manifest.json").read_text())["parameters"] for b in ("base", "base-big"))
    assert big > 2 * small
    sft_big = json.loads((run_dir / "seed-1" / "sft-big" / "manifest.json").read_text())
    assert sft_big["inputs"] == {"base-big": str(run_dir / "base-big"), "dialogues": str(run_dir / "seed-1" / "dialogues")}
    assert "sft-big" in json.loads((run_dir / "seed-1" / "evaluate" / "manifest.json").read_text())["results"]


def test_the_paper_report_gives_each_rows_mean_and_spread_over_the_seeds(ablation):
    run_dir, codes = ablation
    assert f"report: {run_dir / 'report' / 'report.md'}" in codes["test"][1]
    agg = json.loads((run_dir / "report" / "aggregate.json").read_text())
    results = [json.loads((run_dir / f"seed-{s}" / "evaluate" / "manifest.json").read_text())["results"] for s in (0, 1)]
    for label in ("base", "sft", "sft-big", "dpo-1ep", "dpo-sft2", "dpo-nosft"):
        scores = [r[label]["score"] for r in results]
        got = agg["models"][label]["figures"]["score"]
        assert got["mean"] == pytest.approx(statistics.fmean(scores)) and got["sd"] == pytest.approx(statistics.stdev(scores))
        assert got["values"] == scores
    assert [c["epochs"] for c in agg["curve"]] == [1, 2]  # dpo-1ep and dpo-2ep; not the variants with own settings
    assert len(agg["curve"][1]["train_accuracy_by_epoch"]) == 2
    md = (run_dir / "report" / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Figure 3"):
        assert heading in md
    assert "| dSFT-2 (+1 epoch SFT on the AIF best answers) | 6.19 | 78.54 | dpo-sft2 |" in md
    methods = md.split("## Preference methods")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0][2:]: line for line in methods.splitlines() if line.startswith("| dpo-")}
    assert list(rows) == ["dpo-1ep", "dpo-nosft"]  # one epoch of a preference loss; not dpo-2ep, not dpo-sft2
    seconds = agg["per_seed_seconds"]["dpo-1ep"]
    assert len(seconds) == 2 and rows["dpo-1ep"].endswith(
        f"| {statistics.fmean(seconds):.0f} [{min(seconds):.0f}-{max(seconds):.0f}] |")
    assert {"base", "base-big", "sft", "sft-big", "dpo-1ep", "evaluate"} <= set(agg["seconds"])  # manifests' times
    assert all(v >= 0 for v in agg["seconds"].values())


def test_seeds_and_students_are_refused_where_they_cannot_work(tmp_path):
    from dalign.config import ConfigError

    with pytest.raises(ConfigError, match="seeds: a seed is listed twice"):
        load_recipe(None, ["seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="students: a student is pretrained on the world's corpus"):
        load_recipe(None, ["start=smollm2-135m-instruct", "variants=[{name: a, start: start}]",
                           "students=[{name: big, model: {hidden_size: 64}}]"])
    stages = plan(load_recipe(None, ["students=[{name: big, model: {hidden_size: 64}}]", "evaluate.split=dev"]))
    assert {"base-big", "sft-big", "evaluate-dev"} <= set(stages) and "evaluate" not in stages
    assert stages["evaluate-dev"][1]["models"][:2] == ["sft", "sft-big"]
