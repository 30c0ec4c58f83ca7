"""The README's figure: useful tokens per second and peak memory against sequence length, for
dalign and TRL, SFT and DPO, both model sizes, from bench.run's results."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

STYLES = {"dalign": dict(color="tab:blue", marker="o"), "trl": dict(color="tab:gray", marker="s", linestyle="--"),
          "trl padding_free": dict(color="tab:orange", marker="^"),
          "trl precompute_ref_log_probs": dict(color="tab:orange", marker="^"),
          "dalign padded": dict(color="tab:blue", marker="x", linestyle=":")}


def series(results: list[dict], part: str, size: str, trainer: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((res["max_length"], run[key]) for res in results if res["size"] == size and part in res
                    for run in res[part]["runs"] if run["trainer"] == trainer)
    return [x for x, _ in points], [y for _, y in points]


def draw(results: list[dict], path: Path) -> None:
    sizes = sorted({res["size"] for res in results}, key=lambda s: float(s.rstrip("M")))
    parts = [p for p in ("sft", "dpo") if any(p in res for res in results)]
    fig, axes = plt.subplots(2, len(parts) * len(sizes), figsize=(3.6 * len(parts) * len(sizes), 6.4), squeeze=False)
    for col, (part, size) in enumerate((p, s) for p in parts for s in sizes):
        trainers = list(dict.fromkeys(run["trainer"] for res in results if part in res for run in res[part]["runs"]))
        for row, (key, label) in enumerate((("tokens_per_s", "useful tokens / s"), ("peak_gib", "peak memory (GiB)"))):
            ax = axes[row][col]
            for trainer in trainers:
                xs, ys = series(results, part, size, trainer, key)
                ax.plot(xs, ys, label=trainer, **STYLES.get(trainer, {}))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({res["max_length"] for res in results}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylim(bottom=0)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{part.upper()}, {size}")
            else:
                ax.set_xlabel("max length (tokens)")
            if row == 0 and size == sizes[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
