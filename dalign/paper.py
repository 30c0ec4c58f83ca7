"""The paper's Tables 1-3 and Figure 3 beside the miniature's rows, over the seeds of one run.

A recipe with `seeds` leaves one run folder per seed (run_dir/seed-<s>, dalign.recipe). Every
figure here is the mean over those seeds with its spread (the sample standard deviation across
seeds, and the smallest and largest seed), next to the mean of each run's own 95% interval: the
first says how much the recipe's randomness moves a figure, the second how much the finite
test set does. Paper figures are quoted from ../shared/ZEPHYR.md (Tunstall et al., 2023).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from dalign.charts import metrics as _metrics
from dalign.console import manifest_seconds
from dalign.charts import plt
from dalign.page import to_html
from dalign.report import _alignment, _read

PAPER_TABLE1 = [("Zephyr", "7B", "dSFT + dDPO", "7.34", "90.60"), ("Vicuna", "33B", "dSFT", "7.12", "88.99"),
                ("Llama2-Chat", "70B", "RLHF", "6.86", "92.66"), ("Mistral-Instruct", "7B", "SFT", "6.84", "-")]
PAPER_TABLE3 = {"no_sft": ("dDPO on the base model, no SFT", "4.76", "30.76"), "sft": ("dSFT-1", "6.64", "85.65"),
                "sft2": ("dSFT-2 (+1 epoch SFT on the AIF best answers)", "6.19", "78.54"),
                "dpo": ("dSFT-1 + dDPO (1 epoch each)", "7.00", "86.07")}
PAPER_TABLE2 = "Zephyr-7B ARC 62.03, HellaSwag 84.52, MMLU 61.44, TruthfulQA 57.44; Mistral-7B-Instruct 54.52, " \
               "75.63, 55.38, 56.28: dDPO did not cost the knowledge benchmarks"


def seed_runs(root: Path) -> list[Path]:
    runs = sorted((p for p in root.glob("seed-*") if (p / "evaluate" / "manifest.json").exists()),
                  key=lambda p: int(p.name.split("-", 1)[1]))
    if not runs:
        raise FileNotFoundError(f"{root}: no seed-<s> folder with a completed evaluation; run a recipe with seeds")
    return runs


def spread(values: list[float | None]) -> dict | None:
    """Mean, sample standard deviation, min and max over seeds (None where a seed lacks the figure)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def _figures(result: dict) -> dict:
    """The per-run figures aggregated, of one model's evaluation result."""
    w, acc, mc = result.get("win_rate") or {}, result.get("reward_accuracy") or {}, result.get("mc") or {}
    return {"score": result.get("score"), "score_ci": result.get("ci95"), "win_rate": w.get("win_rate"),
            "win_ci": w.get("ci95"), "lc_win_rate": w.get("length_controlled_win_rate"),
            "greedy_accuracy": result.get("greedy_accuracy"), "reward_accuracy": acc.get("reward_accuracy"),
            "knowledge": (mc.get("world_facts") or {}).get("acc"),
            **{f"cat:{c}": v["score"] for c, v in result.get("categories", {}).items()}}


EPOCH_KEYS = ("rewards/accuracy", "rewards/chosen", "rewards/rejected")


def epoch_means(stage_dir: Path) -> dict[str, list[float]]:
    """Training reward accuracy and the chosen and rejected implicit rewards (beta x log-ratio to the
    reference) in each epoch of a dDPO run, from its metrics log (each line a window's mean)."""
    by_epoch: dict[int, list[dict]] = {}
    for m in _metrics(stage_dir):
        if "rewards/accuracy" in m:
            epoch = max(0, int(-(-m["epoch"] // 1)) - 1)  # a window ending at epoch 1.0 belongs to the first
            by_epoch.setdefault(epoch, []).append(m)
    return {k: [statistics.fmean(m[k] for m in lines) for _, lines in sorted(by_epoch.items())] for k in EPOCH_KEYS}


def aggregate(root: Path, runs: list[Path] | None = None) -> dict:
    """Every model's figures over the seeds' runs (default: root's seed-<s> folders), the dDPO
    epochs curve and the wall time of each stage."""
    runs = runs or seed_runs(root)
    evaluations = [_read(run / "evaluate" / "manifest.json") for run in runs]
    labels = list(evaluations[0]["results"])
    models = {}
    for label in labels:
        per_run = [_figures(e["results"].get(label, {})) for e in evaluations]
        manifest = _read(runs[0] / label / "manifest.json") or _read(root / label / "manifest.json")
        models[label] = {"figures": {k: spread([f.get(k) for f in per_run]) for k in per_run[0]},
                         "manifest": manifest, "parameters": _parameters(root, runs[0], label)}
    curve = []
    for label in labels:  # dDPO from dSFT at the recipe's learning rate and beta: the epochs curve
        variant = (models[label]["manifest"] or {}).get("config", {}).get("variant", {})
        if label.startswith("dpo-") and variant.get("start") == "sft" and variant.get("method", "dpo") == "dpo" \
                and variant.get("learning_rate") is None and variant.get("beta") is None and variant.get("loss") is None:
            means = [epoch_means(run / label) for run in runs]
            longest = max(len(m["rewards/accuracy"]) for m in means)
            by_epoch = {k: [spread([m[k][i] for m in means if i < len(m[k])]) for i in range(longest)] for k in EPOCH_KEYS}
            curve.append({"label": label, "epochs": variant["epochs"], **models[label]["figures"],
                          "train_accuracy_by_epoch": by_epoch["rewards/accuracy"], "train_by_epoch": by_epoch})
    stages = sorted({p.name for run in runs for p in run.iterdir() if (p / "manifest.json").exists()})
    shared = sorted(p.name for p in root.iterdir() if (p / "manifest.json").exists())
    seconds = {s: sum(filter(None, (manifest_seconds(_read(run / s / "manifest.json")) for run in runs))) for s in stages}
    seconds.update({s: manifest_seconds(_read(root / s / "manifest.json")) for s in shared})
    per_seed = {s: [manifest_seconds(_read(run / s / "manifest.json")) for run in runs] for s in stages}
    seeds = [(_read(run / "evaluate" / "manifest.json") or {}).get("config", {}).get("evaluate", {}).get("seed")
             for run in runs]
    return {"seeds": [int(r.name.split("-", 1)[1]) if r.name.startswith("seed-") else s for r, s in zip(runs, seeds)],
            "models": models,
            "curve": sorted(curve, key=lambda c: c["epochs"]), "seconds": seconds, "per_seed_seconds": per_seed,
            "questions": evaluations[0]["rows"]}


def _parameters(root: Path, run: Path, label: str) -> int | None:
    """Parameters of a model: its base model's count (the stages after it keep the shape)."""
    base = "base" if label in ("base", "sft") or label.startswith("dpo-") else label.replace("sft-", "base-", 1)
    manifest = _read(root / base / "manifest.json") or _read(run / base / "manifest.json")
    return manifest and manifest.get("parameters")


def cell(s: dict | None, pct: bool = False, ci: dict | None = None) -> str:
    """mean ± sd over seeds [min-max], and the mean per-run interval."""
    if s is None:
        return "-"
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.2f}")
    text = f"{f(s['mean'])} ± {f(s['sd'])} [{f(s['min'])}-{f(s['max'])}]" if s["n"] > 1 else f(s["mean"])
    return text + (f" (run ±{f(ci['mean'])})" if ci else "")


def _row_kind(label: str, manifest: dict | None) -> str | None:
    variant = (manifest or {}).get("config", {}).get("variant", {})
    if label in ("sft", "base"):
        return label
    if variant.get("method") == "sft":
        return "sft2"
    plain = variant.get("learning_rate") is None and variant.get("loss") in (None, "sigmoid")
    if variant.get("start") in ("start", "base"):
        return "no_sft" if variant.get("loss") in (None, "sigmoid") else None
    return "dpo" if variant.get("epochs") == 1 and plain else None


def _paper_rows(models: dict) -> dict[str, str]:
    """The model standing for each row of the paper's Table 3 (the first of its kind)."""
    kinds: dict[str, str] = {}
    for label, m in models.items():
        if (kind := _row_kind(label, m["manifest"])) and kind not in kinds:
            kinds[kind] = label
    return kinds


def _fig(agg: dict, label: str | None, key: str) -> dict | None:
    return agg["models"][label]["figures"].get(key) if label in agg["models"] else None


def all_models(agg: dict, out: Path) -> list[str]:
    md = ["## All models", "", "| model | parameters | MT-Bench-style score | win rate vs dSFT | LC win rate | "
          "greedy acc. | held-out reward acc. | world-facts acc. (lm-eval) |", "|---|---|---|---|---|---|---|---|"]
    for label, m in agg["models"].items():
        f = lambda key: _fig(agg, label, key)  # noqa: E731
        md.append(f"| {label} | {m['parameters'] or '-'} | {cell(f('score'), ci=f('score_ci'))} | "
                  f"{cell(f('win_rate'), True, f('win_ci'))} | {cell(f('lc_win_rate'), True)} | "
                  f"{cell(f('greedy_accuracy'), True)} | {cell(f('reward_accuracy'), True)} | {cell(f('knowledge'), True)} |")
    return md


def methods(agg: dict, out: Path) -> list[str]:
    """One row per preference method: every variant that trains a preference loss (the recipe's own loss,
    or the one it names) for one epoch, or that replaces dSFT too (sft_data: its epochs are dSFT's), with
    its stage's wall time per seed."""
    rows = []
    for label, m in agg["models"].items():
        variant = (m["manifest"] or {}).get("config", {}).get("variant", {})
        if label.startswith("dpo-") and variant.get("method", "dpo") == "dpo" and (
                variant.get("epochs") == 1 or variant.get("sft_data")):
            f = lambda key: _fig(agg, label, key)  # noqa: E731
            seconds = [s for s in agg["per_seed_seconds"].get(label, []) if s is not None]
            time = f"{statistics.fmean(seconds):.0f}" + (f" [{min(seconds):.0f}-{max(seconds):.0f}]" if len(seconds) > 1
                                                          else "") if seconds else "-"
            rows.append(f"| {label} | {_alignment(label, m['manifest'])} | {cell(f('score'))} | "
                        f"{cell(f('win_rate'), True)} | {cell(f('lc_win_rate'), True)} | "
                        f"{cell(f('reward_accuracy'), True)} | {time} |")
    if not rows:
        return []
    return ["## Preference methods (the same pairs; one epoch each unless the method replaces dSFT too)", "",
            "| model | method | MT-Bench-style | win rate vs dSFT | LC win rate | held-out reward acc. | "
            "seconds per seed [min-max] |", "|---|---|---|---|---|---|---|", *rows, "",
            "The held-out reward accuracy is DPO's implicit reward, beta x log(policy / start), whatever the method "
            "optimised: the reference-free methods (SimPO, ORPO) define no such reward of their own. The seconds are "
            "the stage's, reference pass included where the method makes one; a method that replaces dSFT too "
            "stands against the dSFT stage's seconds plus its dDPO's."]


def table1(agg: dict, out: Path) -> list[str]:
    md = ["## Table 1: a small dDPO model against larger dSFT-only models", "",
          "| paper model | size | alignment | MT-Bench | AlpacaEval |", "|---|---|---|---|---|"]
    md += [f"| {n} | {s} | {a} | {m} | {w} |" for n, s, a, m, w in PAPER_TABLE1]
    md += ["", "| miniature model | parameters | alignment | MT-Bench-style | win rate vs dSFT |", "|---|---|---|---|---|"]
    students = [x for x in agg["models"] if x.startswith("sft-")]
    for label in [_paper_rows(agg["models"]).get("dpo"), *students, "sft"]:
        if label in agg["models"]:
            align = "dSFT + dDPO" if label.startswith("dpo-") else "dSFT"
            md.append(f"| {label} | {agg['models'][label]['parameters'] or '-'} | {align} | "
                      f"{cell(_fig(agg, label, 'score'))} | {cell(_fig(agg, label, 'win_rate'), True)} |")
    return md


def table2(agg: dict, out: Path) -> list[str]:
    md = ["## Table 2: knowledge kept", "", f"Paper: {PAPER_TABLE2}."]
    rows = [f"| {label} | {cell(_fig(agg, label, 'knowledge'), True)} |" for label in agg["models"]
            if _fig(agg, label, "knowledge")]
    if not rows:
        return md + ["", "No knowledge benchmark in this run (evaluate.mc: {tasks: [world_facts]} adds one)."]
    return md + ["", "| miniature model | world-facts acc. (120 atlas questions, 4 choices, log-likelihood) |",
                 "|---|---|", *rows]


def table3(agg: dict, out: Path) -> list[str]:
    md = ["## Table 3: the ablation", "", "| recipe | paper MT-Bench | paper AlpacaEval | miniature model | "
          "MT-Bench-style | win rate vs dSFT |", "|---|---|---|---|---|---|"]
    kinds = _paper_rows(agg["models"])
    for kind, (name, mt, ae) in PAPER_TABLE3.items():
        label = kinds.get(kind)
        md.append(f"| {name} | {mt} | {ae} | {label or '-'} | {cell(_fig(agg, label, 'score'))} | "
                  f"{cell(_fig(agg, label, 'win_rate'), True)} |")
    return md


def epochs_section(agg: dict, out: Path) -> list[str]:
    if not agg["curve"]:
        return []
    figure3(agg["curve"], out / "epochs.png")
    md = ["## Figure 3: dDPO epochs", "", "![epochs](epochs.png)", "",
          "| dDPO epochs | MT-Bench-style | greedy acc. | held-out reward acc. | training reward acc. by epoch | "
          "chosen / rejected reward by epoch |", "|---|---|---|---|---|---|"]
    for c in agg["curve"]:
        t = c["train_by_epoch"]
        accuracy = ", ".join(f"{s['mean']:.1%}" for s in t["rewards/accuracy"] if s)
        rewards = ", ".join(f"{a['mean']:+.2f} / {b['mean']:+.2f}"
                            for a, b in zip(t["rewards/chosen"], t["rewards/rejected"]))
        md.append(f"| {c['epochs']:g} | {cell(c['score'])} | {cell(c['greedy_accuracy'], True)} | "
                  f"{cell(c['reward_accuracy'], True)} | {accuracy} | {rewards} |")
    return md + ["", "Rewards: beta x (log pi - log ref) of the chosen and the rejected answer, mean over each "
                 "epoch's training pairs (seeds' mean): a negative chosen reward means the chosen answers lost probability."]


def per_category(agg: dict, out: Path) -> list[str]:
    cats = sorted(k for k in next(iter(agg["models"].values()))["figures"] if k.startswith("cat:"))
    if not cats:
        return []
    md = ["## Per category (mean over seeds)", "", "| model | " + " | ".join(c[4:] for c in cats) + " |",
          "|---|" + "---|" * len(cats)]
    return md + [f"| {label} | " + " | ".join(f"{f['mean']:.1f}" if (f := _fig(agg, label, c)) else "-" for c in cats)
                 + " |" for label in agg["models"]]


def wall_time(agg: dict, out: Path) -> list[str]:
    md = ["## Wall time (seconds, summed over seeds; base stages run once)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {s} | {v:.0f} |" for s, v in agg["seconds"].items() if v is not None]
    return md + [f"| all | {sum(v for v in agg['seconds'].values() if v is not None):.0f} |"]


def paper_lines(run: Path, out: Path) -> list[str]:
    """The paper's Tables 1-3 beside one run's rows (a recipe without seeds)."""
    agg = aggregate(run, [run])
    md = ["## Beside the paper", "", "The paper's figures (Zephyr-7B; MT-Bench 1-10 by GPT-4, AlpacaEval win rate "
          "against text-davinci-003) beside this run's miniature ones (the world's judge; win rate against this run's "
          "dSFT model). One run: no spread over seeds (`make ablation` gives one)."]
    for section in (table1, table2, table3):
        md += ["", *[line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in section(agg, out)]]
    return md


def write_paper_report(root: Path, out: Path | None = None) -> Path:
    """Markdown and HTML: Tables 1-3 and Figure 3 beside the miniature's rows, with the seeds' spread."""
    agg, out = aggregate(root), out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# dalign: the paper's tables in miniature ({root})", "",
          f"Seeds {agg['seeds']}; test split ({agg['questions']}). Each cell: mean ± standard deviation over the "
          "seeds [lowest-highest seed], then the mean of the runs' own 95% intervals."]
    for section in (all_models, table1, table2, table3, methods, epochs_section, per_category, wall_time):
        if lines := section(agg, out):
            md += ["", *lines]
    from dalign.report import example_lines, feedback_lines, provenance_lines, training_lines

    first = seed_runs(root)[0]  # a seed's data, answers and provenance stand for the others'
    for lines in (training_lines(seed_runs(root), out), feedback_lines([first], out), example_lines(first, 1),
                  provenance_lines(first)):
        if lines:
            md += ["", *([lines[0], "", f"Seed {first.name.split('-', 1)[1]}'s run."] + lines[1:]
                         if lines[0].startswith("## ") else lines)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(to_html(md, out, title=f"dalign: the paper's tables in miniature ({root.name})"))
    figures = {k: {"figures": m["figures"], "parameters": m["parameters"]} for k, m in agg["models"].items()}
    (out / "aggregate.json").write_text(json.dumps({**agg, "models": figures}, indent=1))
    return out / "report.md"


def figure3(curve: list[dict], path: Path) -> None:
    """Score and accuracies against dDPO epochs, each point the mean over seeds with its spread."""
    fig, (score_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    x = [c["epochs"] for c in curve]
    score_ax.errorbar(x, [c["score"]["mean"] for c in curve], yerr=[c["score"]["sd"] for c in curve], marker="o")
    score_ax.set(title="MT-Bench-style score (test)", xlabel="dDPO epochs")
    for key, name in (("reward_accuracy", "held-out reward acc."), ("greedy_accuracy", "greedy acc.")):
        points = [(c["epochs"], c[key]) for c in curve if c[key]]
        acc_ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["sd"] for p in points],
                        marker="o", label=name)
    longest = curve[-1]["train_accuracy_by_epoch"]
    acc_ax.plot(range(1, len(longest) + 1), [s["mean"] if s else None for s in longest], marker="s",
                label=f"training reward acc. per epoch ({curve[-1]['label']})")
    acc_ax.set(title="accuracies", xlabel="dDPO epochs", ylim=(0, 1))
    acc_ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
