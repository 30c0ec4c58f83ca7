"""KTO: unpaired rows from pairs or ratings, the mismatched sequences, the reference point over
the whole step, learning in the shared loop, and what a recipe refuses."""

import json
from collections import Counter

import pytest

from dalign.binarize import unpair, unpaired_of_row, unpaired_training_rows
from dalign.config import ConfigError, DPOConfig, PairsConfig
from dalign.data import RowError, read_rows, validate_unpaired, write_rows
from dalign.dpo import run_dpo
from dalign.kto import make_rows
from dalign.recipe import RecipeConfig

from test_dpo import margins, setup, world_pairs  # noqa: F401 (setup: the fixture)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


def test_pairs_unpair_into_desirable_chosen_and_undesirable_rejected_rows_once_each():
    pairs = world_pairs(2)
    second = {**pairs[0], "rejected": pairs[1]["rejected"]}  # rejection all: the chosen answer twice
    rows = unpair([pairs[0], second, pairs[1]])
    assert [(r["prompt_id"], r["label"]) for r in rows] == [("p0", True), ("p0", False), ("p0", False),
                                                            ("p1", True), ("p1", False)]
    assert rows[0]["completion"] == pairs[0]["chosen"] and rows[2]["completion"] == pairs[1]["rejected"]
    for row in rows:
        validate_unpaired(row)


def test_ratings_give_every_rated_completion_labelled_by_the_threshold_with_the_pairs_split():
    rated = {"prompt_id": "q", "prompt": [{"role": "user", "content": "hi"}],
             "completions": [{"model": "a", "text": "good", "score": 4.5}, {"model": "b", "text": "meh", "score": 3.0},
                             {"model": "c", "text": "", "score": 5.0}, {"model": "d", "text": "unrated", "score": None}]}
    rows = unpaired_of_row(rated, 3.0)
    assert [(r["model"], r["label"]) for r in rows] == [("a", True), ("b", True)]  # empty and unrated left out
    assert [r["label"] for r in unpaired_of_row(rated, 4.0)] == [True, False]
    many = [{**rated, "prompt_id": f"q{i}"} for i in range(200)]
    cfg = PairsConfig(test_fraction=0.2, dev_fraction=0.1)
    from dalign.binarize import split_of
    train = {r["prompt_id"] for r in unpaired_training_rows(many, 4.0, cfg)}
    assert train == {f"q{i}" for i in range(200) if split_of(f"q{i}", 0.2, 0.1, 0) == "train"}
    assert 100 < len(train) < 180


@pytest.mark.parametrize("row, field", [
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}]}, "label"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}], "label": 1},
     "label"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}], "label": True},
     "completion[0].role"),
])
def test_a_bad_unpaired_row_is_named_by_its_field(row, field):
    with pytest.raises(RowError) as err:
        validate_unpaired(row)
    assert err.value.field == field


def test_each_row_is_mismatched_with_another_rows_completion_and_too_long_rows_are_counted(world_tokenizer):
    rows = unpair(world_pairs(4))
    dropped = Counter()
    made = make_rows(rows + [{**rows[0], "completion": [{"role": "assistant", "content": "word " * 400}]}],
                     world_tokenizer, 256, dropped, seed=0)
    assert dropped == {"too_long": 1} and len(made) == 8
    own = [tuple(m.chosen.input_ids) for m in made]
    for m, row in zip(made, rows):
        assert m.desirable is row["label"]
        assert tuple(m.rejected.input_ids) not in (own[made.index(m)],)  # never its own completion
        head = next(k for k, t in enumerate(m.chosen.labels) if t != -100)
        assert m.rejected.input_ids[:head] == m.chosen.input_ids[:head]  # the row's own prompt
    with pytest.raises(ValueError, match="at least two rows"):
        make_rows(rows[:1], world_tokenizer, 256, Counter(), seed=0)


def kto_config(**kw) -> DPOConfig:
    return DPOConfig(loss="kto", beta=0.5, learning_rate=1e-2, checkpoint_every=100, log_every=1, **kw)


@pytest.fixture
def unpaired(setup):
    write_rows(setup / "unpaired.jsonl", unpair(read_rows(setup / "pairs.jsonl")))
    return setup


def test_kto_raises_the_desirable_answers_over_the_undesirable(unpaired, world_tokenizer):
    summary = run_dpo(kto_config(max_steps=15, per_device_batch_size=8), unpaired / "sft", unpaired / "sft",
                      unpaired / "unpaired.jsonl", unpaired / "kto")
    assert summary["rows"] == {"kept": 32, "dropped": {}} and summary["desirable_rows"] == 16
    assert summary["reference_logps_key"] and (unpaired / "kto" / "reference_logps.json").exists()
    before = margins(unpaired / "sft", unpaired / "pairs.jsonl", world_tokenizer)
    after = margins(unpaired / "kto" / "model", unpaired / "pairs.jsonl", world_tokenizer)
    assert (after - before).mean() > 1.0 and (after > before).float().mean() >= 0.9
    log = [json.loads(line) for line in (unpaired / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert log[0]["desirable"] == pytest.approx(0.5, abs=0.2)
    assert log[-1]["loss"] < log[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) at the start


def test_the_reference_point_covers_the_whole_step_however_it_is_split(unpaired):
    """One micro-batch of 8 rows a step, or 4 of 2: the same z0 each step, so the same weights."""
    whole = run_dpo(kto_config(max_steps=3, per_device_batch_size=8), unpaired / "sft", unpaired / "sft",
                    unpaired / "unpaired.jsonl", unpaired / "whole")
    split = run_dpo(kto_config(max_steps=3, per_device_batch_size=2, gradient_accumulation=4), unpaired / "sft",
                    unpaired / "sft", unpaired / "unpaired.jsonl", unpaired / "split")
    assert whole["global_batch_size"] == split["global_batch_size"] == 8
    logs = [[json.loads(line) for line in (unpaired / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("whole", "split")]
    assert logs[0][-1]["kl"] > 1e-3  # the policy has moved: z0 is not the floor
    for a, b in zip(*logs):
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    from safetensors.torch import load_file
    w, s = (load_file(unpaired / run / "model" / "model.safetensors") for run in ("whole", "split"))
    assert max((w[k] - s[k]).abs().max().item() for k in w) < 1e-4


RECIPE = {"name": "r", "run_dir": "runs/x"}


@pytest.mark.parametrize("variant, dpo, key, says", [
    ({"name": "v", "rows": "ratings", "desirable_score": 4.0}, {}, "variants[0].rows", "needs (chosen, rejected) pairs"),
    ({"name": "v", "loss": "kto", "rows": "ratings"}, {}, "variants[0].desirable_score", "set both"),
    ({"name": "v", "loss": "kto", "desirable_score": 4.0}, {}, "variants[0].desirable_score", "set both"),
    ({"name": "v", "loss": "simpo", "reference": "start"}, {}, "variants[0].reference", "reference-free"),
    ({"name": "v", "loss": "orpo", "start": "start", "reference": "sft"}, {}, "variants[0].reference", "reference-free"),
    ({"name": "v", "loss": "kto"}, {"chosen_nll": 0.5}, "variants[0].loss", "kto's objective has no chosen"),
    ({"name": "v", "method": "sft", "reference": "start"}, {}, "variants[0].reference", "method sft"),
    ({"name": "v", "method": "sft", "rows": "ratings", "desirable_score": 4.0}, {}, "variants[0].rows", "method sft"),
    ({"name": "v", "sft_data": True}, {}, "variants[0].sft_data", "only orpo trains on it"),
    ({"name": "v", "loss": "kto", "sft_data": True}, {}, "variants[0].sft_data", "loss is kto"),
])
def test_a_variant_whose_loss_does_not_fit_its_data_or_reference_is_refused_naming_the_key(variant, dpo, key, says):
    with pytest.raises((ConfigError, ValueError)) as err:
        RecipeConfig.model_validate({**RECIPE, "variants": [variant], "dpo": dpo})
    assert key in str(err.value) and says in str(err.value)


def test_kto_settings_enter_a_stage_hash_only_where_they_are_read():
    plain = RecipeConfig.model_validate({**RECIPE, "variants": [{"name": "v"}]})
    assert "kto_desirable_weight" not in plain.dpo.model_dump() and set(plain.variants[0].model_dump()) == {
        "name", "start", "epochs", "learning_rate", "beta", "method"}
    kto = RecipeConfig.model_validate({**RECIPE, "variants": [{"name": "v", "loss": "kto", "rows": "ratings",
                                                               "desirable_score": 4.0}]})
    from dalign.run import plan
    reads, config = plan(kto)["dpo-v"]
    assert "ratings" in reads and config["pairs"] == {"test_fraction": 0.1, "dev_fraction": 0.1, "seed": 0}
    assert config["variant"]["kto_undesirable_weight"] == 1.0 and config["variant"]["desirable_score"] == 4.0
