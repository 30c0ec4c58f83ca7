"""`dalign report RUN...`: the paper's tables in miniature, as Markdown and as one HTML page.

For each run directory: every model's figures (MT-Bench-style score with its interval, win
rate against the reference, reward accuracy, knowledge); for one run, the paper's Tables 1-3
beside its rows; per-category scores (table and radar chart); training curves; the AI-feedback
data (which ensemble member's answers were chosen and rejected, their scores); example answers
with the judge's score and rationale; and the provenance of every stage, as sentences.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from dalign import charts
from dalign.console import duration, manifest_seconds, rows_text
from dalign.page import to_html


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


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
    method = LOSS_NAMES.get(variant.get("loss") or manifest["config"]["dpo"].get("loss"), "dDPO")
    if variant.get("rows") == "ratings":
        method += f" on every rated completion (desirable from {variant['desirable_score']:g})"
    if manifest.get("rows_from") == "source":
        method += " on unpaired rows read from a file"
    start = "starting model" if "start" in manifest["config"] else "base model"  # a world start has no `start` key
    if variant.get("sft_data"):
        return f"{method} from the {start} on the dSFT data and the pairs, one stage ({epochs})"
    if variant["start"] == "sft":
        return f"dSFT + {method} ({epochs})"
    return f"{method} on the {start}, no SFT ({epochs})"


# How the report names a preference loss (dalign.losses); DPO's own sigmoid is the paper's dDPO.
LOSS_NAMES = {"sigmoid": "dDPO", "ipo": "IPO", "hinge": "hinge DPO", "sigmoid_norm": "length-normalized dDPO",
              "simpo": "SimPO", "orpo": "ORPO", "kto": "KTO"}


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


def results_lines(rows: list[dict], facts: list[tuple[Path, dict]]) -> list[str]:
    md = ["## Results", "", "| run | model | alignment | MT-Bench-style score | win rate vs reference | LC win rate | "
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
    return md


def category_lines(rows: list[dict], out: Path) -> list[str]:
    graded = [r for r in rows if r["categories"]]  # a run with evaluate.skip: [mt_bench] has none
    if not graded:
        return ["## Per category", "", "(no MT-Bench-style grades)"]
    charts.radar(graded, out / "radar.png")
    cats = list(graded[0]["categories"])
    md = ["## Per category", "", "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    md += [f"| {r['run']}/{r['model']} | " + " | ".join(f"{r['categories'].get(c, math.nan):.1f}" for c in cats) + " |"
           for r in graded]
    return md + ["", "![MT-Bench-style score per category (1-10)](radar.png)"]


def training_lines(runs: list[Path], out: Path) -> list[str]:
    if not charts.curves(runs, out / "curves.png"):
        return []
    return ["## Training", "", "![Training curves: dSFT loss; dDPO loss, reward margin and log-probs, each point a "
            "logged window's mean](curves.png)"]


def feedback_lines(runs: list[Path], out: Path) -> list[str]:
    """Which ensemble member's answers the pairs chose and rejected, and the scores of each side."""
    members: dict[str, Counter] = {}
    scores: dict[str, list[float]] = {"chosen": [], "rejected": []}
    rated: dict[str, list[float]] = {}
    for run in runs:
        for split in ("train", "test", "dev"):
            path = run / "pairs" / f"{split}.jsonl"
            for row in map(json.loads, path.read_text().splitlines() if path.exists() else []):
                for side in ("chosen", "rejected"):
                    members.setdefault(row.get(f"{side}_model") or "?", Counter())[side] += 1
                    if row.get(f"score_{side}") is not None:
                        scores[side].append(row[f"score_{side}"])
        path = run / "ratings" / "ratings.jsonl"
        for row in map(json.loads, path.read_text().splitlines() if path.exists() else []):
            for c in row["completions"]:
                if c.get("score") is not None:
                    rated.setdefault(c["model"], []).append(c["score"])
    if not members:
        return []
    charts.feedback(members, scores, out / "feedback.png")
    md = ["## AI feedback", "", "| ensemble member | answers rated | mean score | chosen | rejected |", "|---|---|---|---|---|"]
    for name in sorted(members.keys() | rated.keys()):
        got, n = members.get(name, Counter()), rated.get(name, [])
        md.append(f"| {name} | {len(n)} | {sum(n) / len(n):.2f} | {got['chosen']} | {got['rejected']} |" if n else
                  f"| {name} | - | - | {got['chosen']} | {got['rejected']} |")
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return md + ["", f"Pairs: {len(scores['chosen'])}; mean score of the chosen answer {mean(scores['chosen']):.2f}, "
                 f"of the rejected one {mean(scores['rejected']):.2f} (the rater's four aspects, 1-5, averaged).", "",
                 "![Pairs per ensemble member; scores of the chosen and rejected answers](feedback.png)"]


def _cell(text: str | None, limit: int = 600) -> str:
    """Text fit for one table cell: pipes escaped, line breaks kept, long text cut with a mark."""
    text = (text or "").strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " [...]"
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def _rationale(judgment: dict) -> str:
    """The judge's reply without its closing verdict line."""
    if judgment.get("score") is None:
        return judgment.get("error", "")
    lines = [line.strip() for line in (judgment.get("raw") or "").strip().splitlines()[:-1] if line.strip()]
    # Short 'Name: value' lines (correct, the aspects) share one line; prose keeps its own.
    short = [line for line in lines if len(line) <= 40 and ":" in line]
    return "\n".join([" · ".join(short)] * bool(short) + [line for line in lines if line not in short])


def example_lines(run: Path, per_category: int) -> list[str]:
    """The first held-out questions of each category: every model's two answers, the judge's
    scores and rationale."""
    evaluation = _read(run / "evaluate" / "manifest.json")
    graded = {label: _read(run / "evaluate" / f"{label}.json") for label in evaluation["results"]}
    graded = {label: g for label, g in graded.items() if g and g.get("answers")}
    if not graded or per_category <= 0:
        return []
    md = ["## Example answers", "", f"The first {per_category} held-out question(s) of each category, as each model "
          "answered them (greedy), with the judge's 1-10 score and what it wrote before it."]
    questions = next(iter(graded.values()))["answers"]
    shown: Counter = Counter()
    for i, q in enumerate(questions):
        if shown[q["category"]] >= per_category:
            continue
        shown[q["category"]] += 1
        md += ["", f"### {q['category']}: {q.get('question_id', i)}", ""]
        for turn in (0, 1):
            md += [f"**Turn {turn + 1}.** {_cell(q['turns'][turn], 2000)}", "", "<!-- answers -->",
                   "| model | score | answer | judge |", "|---|---|---|---|"]
            for label, g in graded.items():
                a = g["answers"][i]
                score = a["judgments"][turn]["score"]
                md.append(f"| {label} | {'-' if score is None else f'{score:g}'} | {_cell(a['answers'][turn])} | "
                          f"{_cell(_rationale(a['judgments'][turn]), 400)} |")
            md.append("")
    return md


ROLE_FACTS = (("teacher", "teacher"), ("user_simulator", "user simulator"), ("rater", "rater"), ("judge", "judge"),
              ("comparer", "comparer"))


def provenance_lines(run: Path) -> list[str]:
    """Each stage's manifest as a sentence: what it read, its rows, steps and batch, seeds, roles,
    code version and time."""
    manifests = [m for m in (_read(p) for p in run.glob("*/manifest.json")) if m and m.get("status") == "complete"]
    shared = [m for m in (_read(p) for p in run.parent.glob("base*/manifest.json")) if m] if not manifests or \
        not any(m["stage"] == "base" for m in manifests) else []
    md = ["## Provenance", ""]
    for m in sorted(manifests + shared, key=lambda m: m.get("started", "")):
        bits = []
        if m.get("inputs"):
            bits.append("reads " + ", ".join(m["inputs"]))
        if rows := rows_text(m, reasons=True):
            bits.append(rows)
        if isinstance(m.get("rows"), dict) and m["rows"].get("replay"):
            bits.append(f"{m['rows']['replay']} replay rows")
        if m.get("steps"):
            bits.append(f"{m['steps']} steps, global batch {m['global_batch_size']} ({m['per_device_batch_size']} per "
                        f"device x {m['gradient_accumulation']} accumulation x {m['processes']} process"
                        f"{'es' if m['processes'] != 1 else ''}, {m['engine']})")
        if m.get("seeds"):
            bits.append("seeds " + ", ".join(f"{k} {v}" for k, v in m["seeds"].items()))
        bits += [f"{name} {m[key]}" for key, name in ROLE_FACTS if isinstance(m.get(key), str)]
        code = str(m.get("code_version", "?"))
        bits.append(f"code {code[:10]}{' (uncommitted changes)' if code.endswith('+dirty') else ''}")
        if (seconds := manifest_seconds(m)) is not None:
            bits.append(duration(seconds))
        md.append(f"- **{m['stage']}**: " + "; ".join(bits) + ".")
    return md


def write_report(runs: list[Path], out: Path, examples_per_category: int = 1) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows, facts = [], []
    for run in runs:
        r, f = run_rows(run)
        rows += r
        facts.append((run, f))
    evaluation = facts[0][1]["evaluate"]
    md = [f"# dalign report: {', '.join(str(run) for run in runs)}", "",
          f"Recipe {rows[0]['provenance']['recipe']}; evaluated on the {evaluation.get('split', 'test')} split "
          f"({', '.join(f'{v} {k}' for k, v in evaluation.get('rows', {}).items()).replace('_', ' ')}); judge "
          f"{evaluation.get('judge')}, comparer {evaluation.get('comparer')}; code {str(evaluation.get('code_version'))[:10]}."]
    md += ["", *results_lines(rows, facts)]
    if len(runs) == 1:
        from dalign.paper import paper_lines

        md += ["", *paper_lines(runs[0], out)]
    md += ["", *category_lines(rows, out)]
    for section in (training_lines(runs, out), feedback_lines(runs, out),
                    *(example_lines(run, examples_per_category) for run in runs), *(provenance_lines(run) for run in runs)):
        if section:
            md += ["", *section]
    md += ["", "## Decontamination", "", *(f"- {line}" for run in runs for line in decontamination_lines(run))]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(to_html(md, out, title=f"dalign report: {', '.join(run.name for run in runs)}"))
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
