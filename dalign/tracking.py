"""The trackers a training stage also logs to (train.report_to): TensorBoard and wandb.

metrics.jsonl stays the stage's record; the numbers of each of its lines go as well, at the
line's step, to every tracker named, through accelerate's tracker classes, from rank 0 alone.
TensorBoard writes its event files in <stage>/tensorboard/, wandb a run named after the stage in
<stage>/wandb/, offline unless WANDB_MODE says otherwise (no login, no network). A resumed stage
writes again the lines after its last checkpoint: TensorBoard's writer is opened with
purge_step at the first of them, which hides the earlier attempt's events from that step on, so
each step reads back one value.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

from dalign.config import ConfigError


def check(report_to: Sequence[str], where: str) -> None:
    """Refuse, before the stage trains, a tracker whose package is not installed (`where` names
    the recipe section)."""
    for name in report_to:  # each tracker's package has the tracker's name
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"{where}.report_to: {name} needs the {name} package, which is not installed: "
                              f"pip install {name} (or pip install dalign[tracking]), or drop {name} from "
                              f"{where}.report_to")


class Trackers:
    """The started trackers of one stage (none on the processes other than rank 0)."""

    def __init__(self, started: list):
        self.started = started

    def log(self, line: dict) -> None:
        """A metrics.jsonl line's numbers, at its step."""
        scalars = {k: v for k, v in line.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.started:
            tracker.log(scalars, step=line["step"])

    def finish(self) -> None:
        """Close the event files, end the wandb run. A stage that fails leaves them to the process's
        exit: the events are flushed at each line, and wandb marks a run whose script failed."""
        for tracker in self.started:
            tracker.finish()


def start(report_to: Sequence[str], out: Path, resume_step: int, main: bool, config: dict) -> Trackers:
    """The trackers of `report_to` for the stage in `out` (on rank 0: `main`), resuming after step
    `resume_step`; `config` is recorded with the wandb run."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    started = []
    for name in dict.fromkeys(report_to) if main else ():  # rank 0 alone writes; a name given twice is one tracker
        if name == "tensorboard":
            # accelerate writes in logging_dir/run_name; purge_step goes to the SummaryWriter.
            tracker = TensorBoardTracker("tensorboard", out, purge_step=resume_step + 1)
        else:
            # The project and mode given here would override wandb's environment variables: read them first.
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT") or "dalign", name=out.name, group=out.parent.name,
                                   dir=str(out), mode=os.environ.get("WANDB_MODE") or "offline", config=config,
                                   reinit="create_new")  # never reuses, nor finishes, another run of the process
        tracker.start()
        started.append(tracker)
    return Trackers(started)
