"""What a run prints: one progress bar per stage, one summary line per finished stage, and no
library chatter between them.

On a terminal the bar redraws in place (tqdm). Anywhere else (a log file, CI, `| tee`) a
redrawn bar would be hundreds of carriage-return frames on one line, so it prints a plain
line every tenth of the way instead. Only the main process of a launch prints.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from dalign.parallel import is_main


def quiet_libraries() -> None:
    """Silence what transformers, huggingface_hub, datasets and lm_eval print on every model load
    or save ("Loading weights" bars, shared-tensor notes): a run loads a model many times, and
    their lines buried the stages' own. Warnings and errors still show."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning, after a tokenizer was used
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("lm-eval", "lm_eval", "accelerate", "datasets", "huggingface_hub", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    # Tied embeddings saved once, as transformers expects: accelerate warns of it at every save.
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())


def duration(seconds: float) -> str:
    """'48 s', '2 min 49 s', '1 h 03 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A stage's bar: `update(n)` as work is done, `postfix(loss=...)` for the latest figures.
    Away from a terminal, a line each tenth of the way at most every `every` seconds, and the last."""

    def __init__(self, stage: str, total: int, unit: str, initial: int = 0, every: float = 5.0):
        self.stage, self.total, self.unit, self.n = stage, total, unit, initial
        self.shown = is_main() and total > 0
        self.tty = sys.stderr.isatty()
        self.figures: dict[str, str] = {}
        self.started, self.start_n, self.next_line = time.monotonic(), initial, initial + max(1, total // 10)
        self.every, self.last_line = every, self.started
        self.bar = tqdm(total=total, initial=initial, desc=f"[{stage}]", unit=f" {unit}", dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt}{unit} "
                                   "[{elapsed}<{remaining}{postfix}]",
                        disable=not (self.shown and self.tty))
        if self.shown and not self.tty and initial:
            print(f"[{stage}] resuming at {initial}/{total} {unit}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        now = time.monotonic()
        due = self.n >= self.next_line and now - self.last_line >= self.every and self.n < self.total
        if self.shown and not self.tty and (due or self.n >= self.total):
            self.next_line, self.last_line = self.n + max(1, self.total // 10), now
            elapsed, done = now - self.started, self.n - self.start_n
            eta = elapsed / done * (self.total - self.n) if done else 0
            left = f", about {duration(eta)} left" if eta >= 1 and self.n < self.total else ""
            figures = "".join(f", {k} {v}" for k, v in self.figures.items())
            print(f"[{self.stage}] {self.n}/{self.total} {self.unit} ({self.n / self.total:.0%}) in "
                  f"{duration(elapsed)}{left}{figures}", file=sys.stderr, flush=True)

    def postfix(self, **figures: float | str) -> None:
        self.figures = {k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in figures.items()}
        self.bar.set_postfix(self.figures, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_summary(name: str, manifest: dict, stage_dir: Path) -> str:
    """One line for a finished stage: its rows kept and dropped (by reason), its steps and the
    loss they went from and to (its metrics log), its time."""
    parts = [rows_text(manifest, reasons=True)]
    if (steps := manifest.get("steps")) is not None:
        parts.append(f"{steps} steps")
    log = stage_dir / "metrics.jsonl"
    losses = [line["loss"] for line in map(json.loads, log.read_text().splitlines() if log.exists() else [])
              if "loss" in line]
    if losses:
        parts.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if (seconds := manifest_seconds(manifest)) is not None:
        parts.append(duration(seconds))
    return f"[{name}] done: " + "; ".join(p for p in parts if p)


def rows_text(manifest: dict, reasons: bool = False) -> str:
    """A manifest's row counts: kept and dropped (by reason), or its rows by kind."""
    rows = manifest.get("rows")
    if isinstance(rows, int):  # a training stage's rows
        return f"{rows} rows"
    if not isinstance(rows, dict):
        return ""
    if "kept" not in rows:  # an evaluation: questions and instructions
        return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in rows.items() if isinstance(v, int))
    dropped = rows.get("dropped") or {}
    n = sum(dropped.values()) if isinstance(dropped, dict) else dropped
    counted = {k: v for k, v in dropped.items() if v} if isinstance(dropped, dict) else {}
    why = f" ({', '.join(f'{k} {v}' for k, v in counted.items())})" if reasons and counted else ""
    return f"{rows['kept']} rows kept, {n} dropped{why}"


def manifest_seconds(manifest: dict | None) -> float | None:
    """Wall time from a manifest's started and finished stamps (second resolution). A resumed
    stage counts from its first start."""
    fmt = "%Y-%m-%dT%H:%M:%S"
    if not manifest:
        return None
    try:
        return (datetime.strptime(manifest["finished"], fmt) - datetime.strptime(manifest["started"], fmt)).total_seconds()
    except (KeyError, ValueError):
        return None
