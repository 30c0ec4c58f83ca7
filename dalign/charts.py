"""The report's charts, as PNG files: per-category radar, training curves, the AI-feedback data."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def metrics(stage_dir: Path) -> list[dict]:
    """A training stage's logged lines (skipped steps' lines have no loss and are left out)."""
    path = stage_dir / "metrics.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return [m for m in lines if "loss" in m]


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def radar(rows: list[dict], path: Path) -> None:
    cats = list(rows[0]["categories"])
    angles = [2 * math.pi * i / len(cats) for i in range(len(cats))] + [0.0]
    fig = plt.figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot(111, polar=True)
    for row in rows:
        values = [row["categories"][c] for c in cats]
        ax.plot(angles, values + values[:1], label=f"{row['run']}/{row['model']}", linewidth=1.6)
    ax.set_xticks(angles[:-1], cats)
    ax.set_ylim(0, 10)
    ax.legend(loc="upper left", fontsize=8, bbox_to_anchor=(1.08, 1.0))
    _save(fig, path)


def curves(runs: list[Path], path: Path) -> bool:
    """dSFT loss by step; dDPO loss, reward margin and the chosen and rejected log-probs by epoch.
    False when no stage logged anything."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    sft_ax, loss_ax, margin_ax, logp_ax = axes.flat
    drawn = False
    for run in runs:
        for stage in sorted(p for p in run.glob("sft*") if p.is_dir()):
            if lines := metrics(stage):
                sft_ax.plot([m["step"] for m in lines], [m["loss"] for m in lines], label=f"{run.name}/{stage.name}")
                drawn = True
        for stage in sorted(run.glob("dpo-*")):
            lines = [m for m in metrics(stage) if "rewards/margin" in m]
            if not lines:
                continue
            drawn, label, epoch = True, f"{run.name}/{stage.name}", [m["epoch"] for m in lines]
            loss_ax.plot(epoch, [m["loss"] for m in lines], label=label)
            margin_ax.plot(epoch, [m["rewards/margin"] for m in lines], label=label)
            line, = logp_ax.plot(epoch, [m["logps/chosen"] for m in lines], label=f"{label} chosen")
            logp_ax.plot(epoch, [m["logps/rejected"] for m in lines], linestyle="--", color=line.get_color(),
                         label=f"{label} rejected")
    for ax, title, x in ((sft_ax, "dSFT loss", "step"), (loss_ax, "dDPO loss", "epoch"),
                         (margin_ax, "dDPO reward margin (chosen - rejected)", "epoch"),
                         (logp_ax, "dDPO log-probs: chosen (solid), rejected (dashed)", "epoch")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return drawn


def feedback(members: dict[str, Counter], scores: dict[str, list[float]], path: Path) -> None:
    """How often each ensemble member's answer was chosen or rejected, and the scores of both sides."""
    fig, (count_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = sorted(members)
    x = range(len(names))
    count_ax.bar([i - 0.2 for i in x], [members[n]["chosen"] for n in names], width=0.4, label="chosen")
    count_ax.bar([i + 0.2 for i in x], [members[n]["rejected"] for n in names], width=0.4, label="rejected")
    count_ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    count_ax.set_title("pairs per ensemble member", fontsize=10)
    count_ax.legend(fontsize=8)
    bins = [i / 4 for i in range(3, 22)]  # scores are means of four 1-5 aspects: steps of 0.25
    for side in ("chosen", "rejected"):
        score_ax.hist(scores[side], bins=bins, alpha=0.6, label=side)
    score_ax.set(xlabel="rater's score (mean of four aspects, 1-5)")
    score_ax.set_title("scores of chosen and rejected answers", fontsize=10)
    score_ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
