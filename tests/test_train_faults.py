"""A non-finite loss or gradient stops training at its step, naming the rows, before anything
of that step is saved: the last good checkpoint is the one a rerun resumes from."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import torch

from dalign.config import TrainConfig
from dalign.sft import dialogue_examples
from dalign.train import NonFiniteError, Plan, TokenObjective, collate, latest_checkpoint, train
from test_train import read_metrics, state, tiny_model, world_dialogues


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread."""


class Poisoned(TokenObjective):
    """The token loss, poisoned from call `at` on: "loss" makes the loss NaN, "grad" keeps the
    loss finite and makes the gradient NaN (0 * sqrt(0) is 0 forward and 0 * inf back)."""

    def __init__(self, at: int, how: str):
        self.calls, self.at, self.how = 0, at, how

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        if self.calls >= self.at:
            if self.how == "loss":
                loss = loss * float("nan")
            else:
                weight = next(model.parameters())
                loss = loss + 0 * torch.sqrt(weight - weight.detach()).sum()
        return loss, metrics


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_non_finite_step_stops_naming_it_and_the_last_good_checkpoint_resumes(world_tokenizer, tmp_path, how):
    examples = dialogue_examples(world_dialogues(8), world_tokenizer, 128, Counter())
    rows = [[e] for e in examples]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=4, per_device_batch_size=2, gradient_accumulation=2, checkpoint_every=1, log_every=1)
    straight = tiny_model(world_tokenizer)
    train(straight, rows, make, cfg, tmp_path / "straight")

    # Two micro-batches a step: call 6 is step 3's second micro-batch.
    with pytest.raises(NonFiniteError) as err:
        train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "run", objective=Poisoned(6, how))
    message = str(err.value)
    assert "step 3" in message and "step-2" in message
    if how == "loss":
        third = Plan(rows, cfg, 1, 0).micro_indices(2)[1]
        assert f"micro-batch(es) [1] (training rows {sorted(third)}" in message
    else:
        assert "gradient norm is nan" in message
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-2"
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]

    resumed = tiny_model(world_tokenizer)
    assert train(resumed, rows, make, cfg, tmp_path / "run")["resumed_from_step"] == 2
    assert all(torch.equal(v, state(straight)[k]) for k, v in state(resumed).items())


class PoisonedOnce(Poisoned):
    """Poisoned on call `at` only: one bad step, the rest good."""

    def loss(self, model, batch):
        loss, metrics = TokenObjective.loss(self, model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.at else loss), metrics


def test_skip_non_finite_skips_the_step_logs_and_counts_it(world_tokenizer, tmp_path):
    examples = dialogue_examples(world_dialogues(8), world_tokenizer, 128, Counter())
    rows = [[e] for e in examples]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=4, per_device_batch_size=2, gradient_accumulation=2, checkpoint_every=1, log_every=1,
                      skip_non_finite=True)
    model = tiny_model(world_tokenizer)
    before = state(model)
    # Call 5 is step 3's first micro-batch.
    summary = train(model, rows, make, cfg, tmp_path / "run", objective=PoisonedOnce(5, "loss"))
    assert summary["skipped_steps"] == 1
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and list(lines[2]) == ["step", "skipped"]
    assert "step 3: the loss is not finite" in lines[2]["skipped"]
    after = state(model)
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(before[k], after[k]) for k in after)
    # The skipped step took no schedule step either: the learning rate after step 4 is the one after step 3 of a run
    # that never met the bad step.
    assert lines[3]["lr"] == read_metrics_lr_after(world_tokenizer, rows, make, cfg, tmp_path, steps=3)


def read_metrics_lr_after(tokenizer, rows, make, cfg, tmp_path, steps: int) -> float:
    train(tiny_model(tokenizer), rows, make, cfg, tmp_path / "clean")
    return read_metrics(tmp_path / "clean" / "metrics.jsonl")[steps - 1]["lr"]
