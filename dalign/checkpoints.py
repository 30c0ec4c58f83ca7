"""Resumable checkpoints of a training stage, written by every process together.

A checkpoint is accelerate's `save_state` of the prepared model, optimizer and schedule (and
each process's random state), so it is sharded exactly where the engine shards: one file of
weights under DDP, torch.distributed.checkpoint shards under FSDP2, DeepSpeed's partitions
under ZeRO. Every process writes its part into `step-N.tmp`; only when all have finished does
rank 0 add `state.json` and rename the folder, so a checkpoint exists whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path


def remove_partial(folder: Path) -> None:
    """Folders of checkpoints that a killed run left half written (rank 0 only)."""
    for tmp in folder.glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("step-*") if (p / "state.json").exists() and not p.name.endswith(".tmp")]
    return max(found, key=_step_of, default=None)


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> None:
    """Every process must call this (saving a sharded state is collective)."""
    path = folder / f"step-{step}"
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's part is on disk
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        # Older checkpoints go once a newer one is whole (a 7B model's, with AdamW, is over 100 GB).
        for old in sorted((p for p in folder.glob("step-*") if not p.name.endswith(".tmp")), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path: Path) -> int:
    """Restore the prepared objects from `path` (every process); returns its step."""
    with weights_only_loads():
        # accelerate skips random states it cannot load with only a log line (the resumed run would
        # then draw other numbers); loading them first makes a refused file an error here.
        from accelerate.utils import load

        for states in path.glob("random_states_*.pkl"):
            load(states)
        accelerator.load_state(str(path))
    return json.loads((path / "state.json").read_text())["step"]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside unpickles tensors and plain containers only, never code: a file
    planted in a checkpoint folder cannot run anything. Needed because accelerate unpickles the
    objects registered for checkpointing (the schedule) with weights_only=False, and DeepSpeed
    its partitions likewise; torch's own switch overrides both."""
    import torch

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into its optimizer partitions (the loss scaler, the ZeRO stage,
    ZeRO-2's fragment addresses: plain data). Allowed by name, which lets the weights-only unpickler
    rebuild instances of them and still refuse every other global, and code."""
    if "deepspeed" not in sys.modules:  # not a DeepSpeed run: nothing to allow
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
