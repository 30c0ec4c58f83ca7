"""`dalign report RUN...`: the paper's tables in miniature, as Markdown and HTML.

For each run directory: a table in the shape of the paper's Tables 1 and 3 (model,
alignment, MT-Bench-style score with its interval, win rate against dSFT with its interval,
DPO reward accuracy), per-category scores as a radar chart, training curves (loss, reward
margin), the data facts DPO depends on, and the provenance of every row.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _alignment(label: str, manifest: dict | None) -> str:
    if label == "base":
        return "none (base model)"
    if label == "start":
        return "none (starting model)"
    if label == "sft" or label.startswith("sft-"):
        return "dSFT" + (f" (student {label[4:]})" if label != "sft" else "")
    variant = manifest["config"]["variant"]
    epochs = f"{variant['epochs']:g} epoch{'s' if variant['epochs'] != 1 else ''}"
    if variant.get("method") == "sft":
        return f"dSFT-2: dSFT + SFT on the pairs' chosen answers ({epochs})"
    if variant["start"] == "sft":
        return f"dSFT + dDPO ({epochs})"
    start = "starting model" if "start" in manifest["config"] else "base model"  # a world start has no `start` key
    return f"dDPO on the {start}, no SFT ({epochs})"


def run_rows(run: Path) -> tuple[list[dict], dict]:
    evaluation = _read(run / "evaluate" / "manifest.json")
    if evaluation is None or evaluation.get("status") != "complete":
        raise FileNotFoundError(f"{run}: no completed evaluation; run `dalign run` first")
    rows = []
    for label, r in evaluation["results"].items():
        manifest = _read(run / label / "manifest.json")
        w, acc = r.get("win_rate"), r.get("reward_accuracy")
        rows.append({"run": run.name, "model": label, "alignment": _alignment(label, manifest), "score": r.get("score"),
                     "ci95": r.get("ci95"), "win_rate": w and w["win_rate"], "win_ci95": w and w["ci95"],
                     "lc_win_rate": w and w["length_controlled_win_rate"],
                     "reward_accuracy": acc and acc["reward_accuracy"], "reward_ci95": acc and acc["ci95"],
                     "categories": {c: v["score"] for c, v in r.get("categories", {}).items()},
                     "greedy_accuracy": r.get("greedy_accuracy"), "pass_at_k": r.get("pass_at_k"),
                     "knowledge": (r.get("mc") or {}).get("world_facts", {}).get("acc"),
                     "provenance": {"recipe": manifest and manifest.get("recipe"), "code": manifest and manifest.get("code_version"),
                                    "global_batch": manifest and manifest.get("global_batch_size"),
                                    "rows": manifest and manifest.get("rows")}})
    facts = {"pairs": _read(run / "pairs" / "manifest.json"), "dialogues": _read(run / "dialogues" / "manifest.json"),
             "evaluate": evaluation, "k": evaluation["config"]["evaluate"]["pass_k"]}
    facts["reference"] = evaluation.get("reference")
    return rows, facts


def _pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" + (f" ± {ci:.1%}" if ci is not None and not math.isnan(ci) else "")


def _score(row: dict) -> str:
    return "-" if row["score"] is None else f"{row['score']:.2f} ± {row['ci95']:.2f}"


def radar(rows: list[dict], path: Path) -> None:
    cats = list(rows[0]["categories"])
    angles = [2 * math.pi * i / len(cats) for i in range(len(cats))] + [0.0]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(111, polar=True)
    for row in rows:
        values = [row["categories"][c] for c in cats]
        ax.plot(angles, values + values[:1], label=f"{row['run']}/{row['model']}")
    ax.set_xticks(angles[:-1], cats)
    ax.set_ylim(0, 10)
    ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.3, -0.1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def curves(runs: list[Path], path: Path) -> None:
    fig, (sft_ax, loss_ax, margin_ax) = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        sft = _metrics(run / "sft")
        sft_ax.plot([m["step"] for m in sft], [m["loss"] for m in sft], label=run.name)
        for stage in sorted(run.glob("dpo-*")):
            lines = _metrics(stage)
            label = f"{run.name}/{stage.name}"
            loss_ax.plot([m["epoch"] for m in lines], [m["loss"] for m in lines], label=label)
            margin_ax.plot([m["epoch"] for m in lines], [m["rewards/margin"] for m in lines], label=label)
    for ax, title in ((sft_ax, "dSFT loss (by step)"), (loss_ax, "dDPO loss (by epoch)"), (margin_ax, "dDPO reward margin")):
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_report(runs: list[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows, facts = [], []
    for run in runs:
        r, f = run_rows(run)
        rows += r
        facts.append((run, f))
    graded = [r for r in rows if r["categories"]]  # a run with evaluate.skip: [mt_bench] has none
    if graded:
        radar(graded, out / "radar.png")
    curves(runs, out / "curves.png")
    md = ["# dalign report", "", "| run | model | alignment | MT-Bench-style score | win rate vs reference | LC win rate | "
          "held-out reward acc. | world-facts acc. |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['run']} | {r['model']} | {r['alignment']} | {_score(r)} | "
                  f"{_pct(r['win_rate'], r['win_ci95'])} | {_pct(r['lc_win_rate'])} | "
                  f"{_pct(r['reward_accuracy'], r['reward_ci95'])} | {_pct(r['knowledge'])} |")
    md += ["", "Scores: the judge's 1-10, mean over two turns, 95% interval. Win rate: against each run's reference "
           "(" + ", ".join(f"{run.name}: {f['reference']}" for run, f in facts) + "), both answer orders judged, "
           "a verdict that follows the position counts as a tie (half a win); LC: length-controlled. Reward accuracy: "
           "held-out pairs whose implicit DPO reward prefers the chosen answer.", ""]
    for run, f in facts:
        pairs, k = f["pairs"], f["k"]
        sft = f["evaluate"]["results"].get("sft", {})
        line = f"**{run.name}**: {_pct(pairs and pairs.get('share_scores_differ'))} of AI-feedback pairs have " \
               "chosen and rejected of different scores"
        if "pass_at_k" in sft:
            line += f"; the dSFT model's pass@{k} is {_pct(sft['pass_at_k'])} against greedy accuracy " \
                    f"{_pct(sft['greedy_accuracy'])}"
        md.append(line + ".")
    md += ["", "## Per category", "", "![radar](radar.png)" if graded else "(no MT-Bench-style grades)", "",
           "## Training", "", "![curves](curves.png)", "",
           "## Provenance", "", "| run | model | recipe | code | global batch | rows |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["provenance"]
        md.append(f"| {r['run']} | {r['model']} | {p['recipe']} | {p['code']} | {p['global_batch'] or '-'} | "
                  f"{json.dumps(p['rows']) if p['rows'] else '-'} |")
    md += ["", "## Decontamination", "", *(line for run in runs for line in decontamination_lines(run))]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(md, out))
    return out / "report.md"


def decontamination_lines(run: Path) -> list[str]:
    """What each training stage's rows were checked against and how many were dropped, by set."""
    lines = []
    for manifest in sorted(run.glob("*/manifest.json")):
        checked = (_read(manifest) or {}).get("decontamination")
        if checked is None:
            continue
        stage = manifest.parent.name
        if not checked["checked"]:
            lines.append(f"**{run.name}/{stage}**: not checked ({checked['reason']}).")
            continue
        sets = ", ".join(f"{name} {n}" for name, n in checked["by_set"].items())
        lines.append(f"**{run.name}/{stage}**: {checked['dropped']} of {checked['rows']} training rows dropped for "
                     f"sharing a {checked['n']}-word run with an evaluation set ({sets}).")
    return lines


def _html(md: list[str], out: Path) -> str:
    """The Markdown as plain HTML, images embedded so the page stands alone."""
    body, table = [], []
    for line in md + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
            continue
        if table:
            body.append("<table border=1 cellpadding=4>" + "".join(table) + "</table>")
            table = []
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<img src="data:image/png;base64,{data}" alt="{name}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    return "<!doctype html><meta charset=utf-8><title>dalign report</title>" + "\n".join(body)
