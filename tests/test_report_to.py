"""train.report_to: every metrics.jsonl line's numbers also go to TensorBoard and to an offline
wandb run, read back here from the files they write; a resumed run leaves one value per step;
the training itself is unchanged; a wrong or missing tracker is refused before training."""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dalign.config import ConfigError, TrainConfig
from dalign.recipe import load_recipe
from dalign.run import plan
from dalign.sft import dialogue_examples
from dalign.train import collate, latest_checkpoint, train
from test_train import Interrupt, dies_after, read_metrics, state, tiny_model, world_dialogues

# 12 rows / global batch 4: 6 steps cross an epoch boundary; a line at every step, a checkpoint every 3.
CFG = TrainConfig(learning_rate=5e-3, max_steps=6, per_device_batch_size=2, gradient_accumulation=2,
                  checkpoint_every=3, log_every=1, warmup_ratio=0.2, max_length=128)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: a straight run and a resumed one compute the same numbers."""


@pytest.fixture(scope="module")
def rows(world_tokenizer):
    return [[e] for e in dialogue_examples(world_dialogues(12), world_tokenizer, 128, Counter())]


@pytest.fixture
def make(world_tokenizer):
    return partial(collate, pad_id=world_tokenizer.pad_token_id)


def tensorboard_scalars(logdir, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `logdir`: (step, value) in the order read, as
    TensorBoard shows them (`purge`: with the events a restart hid taken out)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0},
                                             purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_logged(metrics: list[dict], skip: tuple[str, ...] = ()) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl lines as TensorBoard stores them: each number per tag, at its step, in float32."""
    keys = {k for m in metrics for k in m} - {"step", *skip}
    return {k: [(m["step"], float(np.float32(m[k]))) for m in metrics if k in m] for k in keys}


def test_tensorboard_holds_every_metrics_line_and_the_training_is_unchanged(rows, make, world_tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    tracked = tiny_model(world_tokenizer)
    train(tracked, rows, make, CFG.model_copy(update={"report_to": ["tensorboard"]}), tmp_path / "tracked")
    metrics = read_metrics(tmp_path / "tracked" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    scalars = tensorboard_scalars(tmp_path / "tracked" / "tensorboard")
    assert set(scalars) == {"loss", "lr", "grad_norm", "epoch", "tokens_per_second"}
    assert scalars == as_logged(metrics)  # each tag, each step once, each value
    assert not (tmp_path / "tracked" / "wandb").exists()

    plain = tiny_model(world_tokenizer)
    train(plain, rows, make, CFG, tmp_path / "plain")
    assert not (tmp_path / "plain" / "tensorboard").exists()
    for key, value in state(plain).items():
        assert torch.equal(value, state(tracked)[key]), key
    untimed = lambda lines: [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in lines]  # noqa: E731
    assert untimed(read_metrics(tmp_path / "plain" / "metrics.jsonl")) == untimed(metrics)


@pytest.mark.parametrize("checkpoint_every, resumed_from", [(3, 3), (100, 0)])
def test_a_resumed_run_reads_back_one_value_per_step(rows, make, world_tokenizer, tmp_path, checkpoint_every,
                                                     resumed_from):
    pytest.importorskip("tensorboard")
    cfg = CFG.model_copy(update={"checkpoint_every": checkpoint_every, "report_to": ["tensorboard"]})
    train(tiny_model(world_tokenizer), rows, make, CFG, tmp_path / "straight")
    with pytest.raises(Interrupt):  # two micro-batches a step: dies in step 5, after step 4 was logged
        train(tiny_model(world_tokenizer), rows, dies_after(make, 8), cfg, tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (checkpoint.name if checkpoint else None) == (f"step-{resumed_from}" if resumed_from else None)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "run" / "tensorboard")["loss"]] == [1, 2, 3, 4]
    assert train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "run")["resumed_from_step"] == resumed_from

    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert all([s for s, _ in values] == [1, 2, 3, 4, 5, 6] for values in scalars.values()), scalars
    assert scalars == as_logged(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    straight = as_logged(read_metrics(tmp_path / "straight" / "metrics.jsonl"), skip=("tokens_per_second",))
    assert {k: v for k, v in scalars.items() if k != "tokens_per_second"} == straight
    # The check can fail: without the purge the steps logged after the checkpoint read back twice.
    raw = [s for s, _ in tensorboard_scalars(tmp_path / "run" / "tensorboard", purge=False)["loss"]]
    assert sorted(raw) == sorted([1, 2, 3, 4] + list(range(resumed_from + 1, 7)))


def wandb_records(path):
    """The records of a .wandb file: wandb's header, then LevelDB log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(records) -> list[dict]:
    """The run's logged rows as metrics.jsonl lines: the step, and each value but wandb's own (_runtime, ...)."""
    rows = []
    for record in records:
        if record.HasField("history"):
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            rows.append({"step": record.history.step.num, **{k: v for k, v in items.items() if not k.startswith("_")}})
    return rows


def test_wandb_writes_an_offline_run_in_the_stage_folder(rows, make, world_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install dalign[tracking])")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is dalign's default
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written in the home folder
        monkeypatch.setenv(var, str(tmp_path / "home" / var))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = tmp_path / "sft"
    train(tiny_model(world_tokenizer), rows, make, CFG.model_copy(update={"report_to": ["wandb"]}), out)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    records = list(wandb_records(next(runs[0].glob("run-*.wandb"))))
    run = next(r.run for r in records if r.HasField("run"))
    assert run.display_name == "sft" and run.project == "dalign"
    assert json.loads(next(u.value_json for u in run.config.update if u.key == "learning_rate")) == CFG.learning_rate
    assert wandb_history(records) == read_metrics(out / "metrics.jsonl")  # every line, every value, exactly
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]


def test_an_unknown_tracker_fails_validation_naming_report_to():
    with pytest.raises(ValidationError, match="report_to"):
        TrainConfig(report_to=["mlflow"])
    with pytest.raises(ConfigError, match=r"sft\.report_to"):
        load_recipe(None, ["sft.report_to=[tensorboard, mlflow]"])
    tracked = load_recipe(None, ["dpo.report_to=[tensorboard, wandb]", "sft.report_to=[tensorboard]"])
    assert tracked.dpo.report_to == ["tensorboard", "wandb"] and TrainConfig().report_to == []


def test_report_to_is_not_part_of_any_stage_config():
    """It changes nothing a stage makes: turning it on must not make a stage folder look foreign."""
    tracked = load_recipe(None, ["base.report_to=[tensorboard]", "sft.report_to=[wandb]", "dpo.report_to=[tensorboard]"])
    assert plan(tracked) == plan(load_recipe(None))
    assert tracked.dpo_for(tracked.variants[0]).report_to == ["tensorboard"]


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_not_installed_is_refused_before_training(rows, make, world_tokenizer, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # what importlib finds of a package that is not installed
    cfg = CFG.model_copy(update={"report_to": [tracker]})
    with pytest.raises(ConfigError, match=rf"sft\.report_to: {tracker} .*pip install {tracker} .*dalign\[tracking\]"):
        train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "sft", desc="sft")
    assert not (tmp_path / "sft").exists()
