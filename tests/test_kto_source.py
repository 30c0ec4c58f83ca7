"""KTO on unpaired rows read from a file (pairs.source_rows: unpaired, TRL's KTO format: prompt,
completion, label) from a tiny start model: it learns from them which answer is padded, measured
on held-out pairs; a bad row is dropped and counted with its file, row and field; the dataset
card gives each schema its own config, which `datasets` loads; a variant that needs pairs is
refused at load time with its key."""

from __future__ import annotations

import json

import pytest

from dalign.config import ConfigError
from dalign.data import read_rows, write_rows
from dalign.pretrain import build_model
from dalign.recipe import load_recipe
from dalign.run import run_recipe as run
from test_dpo import TINY, world_pairs

PAD = " I hope this helps you."


def settings(tmp_path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"start.model={tmp_path / 'start'}", "skip=[sft]",
            f"pairs.source={{path: {tmp_path / 'kto.jsonl'}}}", "pairs.source_rows=unpaired",
            f"pairs.held_out={{path: {tmp_path / 'held.jsonl'}}}", "evaluate.skip=[mt_bench, win_rate]"]


@pytest.fixture
def recipe(tmp_path, world_tokenizer, one_thread):
    build_model(TINY, world_tokenizer, seed=0).save_pretrained(tmp_path / "start")
    world_tokenizer.save_pretrained(tmp_path / "start")
    # Each training prompt twice: its answer (desirable, prompt and completion as messages, as
    # trl-lib/kto-mix-14k has them) and the answer padded with a stock sign-off (undesirable, as text).
    # The held-out pairs put the same habit on the rejected side.
    rows = world_pairs(96)
    unpaired = [row for r in rows[:64] for row in (
        {"prompt": r["prompt"], "completion": r["chosen"], "label": True},
        {"prompt": r["prompt"][0]["content"], "completion": r["chosen"][0]["content"] + PAD, "label": False})]
    unpaired.append({"prompt": "Hi", "completion": "Hello.", "label": "yes"})  # row 129: not a bool
    write_rows(tmp_path / "kto.jsonl", unpaired)
    write_rows(tmp_path / "held.jsonl", [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                                          "rejected": r["chosen"][0]["content"] + PAD} for r in rows[64:]])
    return load_recipe(None, settings(tmp_path) + [
        "variants=[{name: kto, start: start, loss: kto}]", "dpo.max_steps=30", "dpo.learning_rate=5e-3", "dpo.beta=0.5"])


def test_kto_learns_from_unpaired_rows_read_from_a_file(recipe, tmp_path):
    out = run(recipe)
    assert list(out) == ["pairs", "dpo-kto", "evaluate"]
    read = out["pairs"]["train"]
    assert read["kept"] == 128 and read["dropped"] == {"wrong_type": 1}
    assert str(tmp_path / "kto.jsonl") in read["examples"][0] and "129" in read["examples"][0]
    assert "label" in read["examples"][0]
    kept = read_rows(tmp_path / "run" / "pairs" / "train.jsonl")
    assert sum(r["label"] for r in kept) == 64 and all(r["completion"][0]["role"] == "assistant" for r in kept)
    kto = out["dpo-kto"]
    assert kto["rows_from"] == "source" and kto["rows"]["kept"] == 128 and kto["desirable_rows"] == 64
    held = out["evaluate"]["results"]["dpo-kto"]["reward_accuracy"]
    base = out["evaluate"]["results"]["start"]
    assert held["pairs"] == 32 and held["reward_accuracy"] >= 0.9  # the padded answer is the rejected one
    assert "reward_accuracy" not in base
    datasets = pytest.importorskip("datasets")
    card = (tmp_path / "run" / "pairs" / "README.md").read_text()
    assert "config_name: unpaired" in card and "config_name: pairs" in card
    train = datasets.load_dataset(str(tmp_path / "run" / "pairs"), "unpaired")["train"]
    test = datasets.load_dataset(str(tmp_path / "run" / "pairs"), "pairs")["test"]
    assert train.num_rows == 128 and set(train.features) >= {"prompt", "completion", "label"}
    assert test.num_rows == 32 and set(test.features) >= {"chosen", "rejected"}
    model_card = (tmp_path / "run" / "dpo-kto" / "model" / "README.md").read_text()
    assert "KTO on unpaired rows read from pairs.source" in model_card
    assert json.loads((tmp_path / "run" / "dpo-kto" / "manifest.json").read_text())["status"] == "complete"


def test_the_labels_decide_what_kto_learns(recipe, tmp_path):
    """The same rows with every label reversed: the padded answer comes out preferred."""
    rows = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    write_rows(tmp_path / "kto.jsonl", [{**r, "label": not r["label"]} if isinstance(r["label"], bool) else r
                                        for r in rows])
    held = run(recipe)["evaluate"]["results"]["dpo-kto"]["reward_accuracy"]
    assert held["pairs"] == 32 and held["reward_accuracy"] <= 0.1


@pytest.mark.parametrize("extra, key", [
    (["variants=[{name: a, start: start}]"], "dpo.loss: loss sigmoid needs (chosen, rejected) pairs"),
    (["variants=[{name: a, start: start, loss: simpo}]"], "variants[0].loss: loss simpo needs"),
    (["variants=[{name: a, start: start, method: sft}]"], "variants[0].method: method sft trains on chosen answers"),
])
def test_a_variant_that_needs_pairs_is_refused_on_unpaired_rows(tmp_path, extra, key):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_recipe(None, settings(tmp_path) + extra)
    assert key in str(err.value) and "pairs.source_rows: unpaired" in str(err.value)


def test_unpaired_source_rows_need_a_source(tmp_path):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_recipe(None, [f"run_dir={tmp_path}", "pairs.source_rows=unpaired", "variants=[{name: a, loss: kto}]"])
    assert "pairs.source_rows: unpaired names what pairs.source holds" in str(err.value)
