"""Stage 4: evaluation. MT-Bench style, plus greedy accuracy and pass@k where the judge tells
right from wrong; the AlpacaEval-style win rate (dalign.winrate); held-out reward accuracy.

Two-turn questions per category in MT-Bench's question format, answered by the model at
MT-Bench's per-category temperatures (turn two sees the model's own first answer), and
graded 1-10 per turn by the judge. Every answer and judgment is kept in the output.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import torch

from dalign.backends import Backend, Sampling
from dalign.config import EvalConfig
from dalign.console import Progress
from dalign.data import read_rows, write_json
from dalign.parallel import barrier, rank_and_world
from dalign.judging import JudgeParseError, parse_judgment
from dalign.prompted import REFERENCE_PREFIX
from dalign.world import CATEGORIES
from dalign.world.roles import WorldTeacher, WorldUser, fresh_openings


NEEDS_REFERENCE = ("math", "reasoning", "coding")  # as in FastChat's llm_judge


def make_questions(per_category: int, seed: int, exclude: set[str], tag: str = "eval") -> list[dict]:
    """Held-out two-turn questions in MT-Bench's format, with the teacher's reference answers; each
    first turn is added to `exclude` (dalign.world.roles.fresh_openings)."""
    user, reference = WorldUser(seed=seed), WorldTeacher()
    rows = []
    for category, first in fresh_openings(per_category, seed, tag, exclude):
        conv = [{"role": "user", "content": first}]
        conv.append({"role": "assistant", "content": reference.answer(conv)})
        second = user.ask([{"role": "system", "content": ""}] + conv)
        ref2 = reference.answer(conv + [{"role": "user", "content": second}])
        rows.append({"question_id": len(rows) + 1, "category": category, "turns": [first, second],
                     "reference": [conv[-1]["content"], ref2]})
    return rows


def _answer(model: Backend, convs: list[list[dict]], temps: list[float], cfg: EvalConfig, seed: int) -> list[str]:
    """Answers, each at its category's temperature (per-row sampling: the backend groups them)."""
    return model.generate(convs, [Sampling(t, cfg.max_new_tokens, seed) for t in temps])


def _judge(judge: Backend, convs: list[list[dict]], failures: list) -> list[dict]:
    results = []
    for conv, raw in zip(convs, judge.generate(convs, Sampling(0.0))):
        try:
            j = parse_judgment(raw)
            results.append({"score": j.score, "correct": j.correct, "aspects": j.aspects, "raw": raw})
        except JudgeParseError as err:
            failures.append(str(err))
            results.append({"score": None, "correct": None, "raw": raw, "error": str(err)})
    return results


def _reference(question: dict, turn: int) -> list[dict]:
    """The reference answer as a system message, for the categories where MT-Bench shows the
    judge one (a judge that reads only the user turns, as the world's does, ignores it)."""
    refs = question.get("reference") or []
    if question["category"] not in NEEDS_REFERENCE or turn >= len(refs) or not refs[turn]:
        return []
    return [{"role": "system", "content": REFERENCE_PREFIX + refs[turn]}]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    if not values:
        return float("nan"), float("nan")
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), half


def evaluate_mt_bench(model: Backend, judge: Backend, questions: list[dict], cfg: EvalConfig,
                      correctness: bool = True) -> dict:
    """`correctness`: the judge also says whether an answer is right (the world's does), which
    adds greedy accuracy and pass@k; MT-Bench's own judge gives only the 1-10 rating."""
    temps = [CATEGORIES[q["category"]].temperature for q in questions]
    convs = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    first = _answer(model, convs, temps, cfg, cfg.seed)
    convs2 = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": q["turns"][1]}]
              for c, a, q in zip(convs, first, questions)]
    second = _answer(model, convs2, temps, cfg, cfg.seed + 1)
    failures: list[str] = []
    j1 = _judge(judge, [_reference(q, 0) + c + [{"role": "assistant", "content": a}]
                        for q, c, a in zip(questions, convs, first)], failures)
    j2 = _judge(judge, [_reference(q, 1) + c + [{"role": "assistant", "content": a}]
                        for q, c, a in zip(questions, convs2, second)], failures)
    result = _summary(model, judge, questions, first, second, j1, j2)
    if correctness:
        _add_correctness(result, model, judge, convs, j1, cfg, failures)
    result["judge_failures"] = len(failures)
    return result


def _summary(model: Backend, judge: Backend, questions: list[dict], first: list, second: list, j1: list,
             j2: list) -> dict:
    """MT-Bench's own summary: the mean 1-10 rating over both turns, overall and per category."""
    answers, by_cat = [], defaultdict(list)
    for i, q in enumerate(questions):
        scores = [j["score"] for j in (j1[i], j2[i]) if j["score"] is not None]
        answers.append({**q, "answers": [first[i], second[i]], "judgments": [j1[i], j2[i]],
                        "score": statistics.fmean(scores) if scores else None})
        if answers[-1]["score"] is not None:
            by_cat[q["category"]].append(answers[-1]["score"])
    overall, half = mean_ci([a["score"] for a in answers if a["score"] is not None])
    return {"model": model.name, "judge": judge.name, "questions": len(questions), "score": overall, "ci95": half,
            "categories": {c: {"score": statistics.fmean(v)} for c, v in by_cat.items()}, "answers": answers}


def _add_correctness(result: dict, model: Backend, judge: Backend, convs: list, j1: list, cfg: EvalConfig,
                     failures: list) -> None:
    """Greedy accuracy and pass@k on the first turns, added to the summary's rows, categories and totals."""
    k = cfg.pass_k
    greedy = model.generate(convs, Sampling(0.0, cfg.max_new_tokens, cfg.seed))
    jg = _judge(judge, [c + [{"role": "assistant", "content": a}] for c, a in zip(convs, greedy)], failures)
    samples = model.generate([c for c in convs for _ in range(k)],
                             Sampling(cfg.pass_temperature, cfg.max_new_tokens, cfg.seed + 2))
    js = _judge(judge, [c + [{"role": "assistant", "content": a}]
                        for i, c in enumerate(convs) for a in samples[i * k:(i + 1) * k]], failures)
    answers = result["answers"]
    for i, row in enumerate(answers):
        row.update({"greedy_answer": greedy[i], "greedy_correct": bool(jg[i]["correct"]),
                    "pass_at_k": any(bool(j["correct"]) for j in js[i * k:(i + 1) * k]),
                    "first_turn_correct": bool(j1[i]["correct"])})
    for category, stats in result["categories"].items():
        rows = [r for r in answers if r["category"] == category and r["score"] is not None]
        stats.update({"first_turn_correct": statistics.fmean(r["first_turn_correct"] for r in rows),
                      "greedy_accuracy": statistics.fmean(r["greedy_correct"] for r in rows),
                      "pass_at_k": statistics.fmean(r["pass_at_k"] for r in rows)})
    result.update({"first_turn_correct": statistics.fmean(r["first_turn_correct"] for r in answers),
                   "greedy_accuracy": statistics.fmean(r["greedy_correct"] for r in answers),
                   "pass_at_k": statistics.fmean(r["pass_at_k"] for r in answers), "k": k})


@torch.no_grad()
def reward_accuracy(policy_path, reference_path, pairs_path: Path, beta: float, max_length: int) -> dict:
    """Share of held-out pairs whose implicit reward beta * log(policy / reference) is higher
    for the chosen answer than for the rejected one, with a 95% interval."""
    from transformers import AutoTokenizer

    from dalign.dpo import make_pairs, pair_logps
    from dalign.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    dropped: Counter = Counter()
    pairs = make_pairs(read_rows(pairs_path), tokenizer, max_length, dropped)
    margins = {label: [c - r for c, r in pair_logps(load_model(path).eval(), pairs, 8, tokenizer.pad_token_id)]
               for label, path in (("policy", policy_path), ("reference", reference_path))}
    wins = [float(beta * (p - r) > 0) for p, r in zip(margins["policy"], margins["reference"])]
    rate, half = mean_ci(wins)
    return {"reward_accuracy": rate, "ci95": half, "pairs": len(wins), "too_long": dropped["too_long"]}


def held_out(cfg: EvalConfig, models: dict, seen: set[str]) -> tuple[list[dict], tuple]:
    """The split's two-turn questions and its win-rate inputs (dalign.winrate): instructions, reference
    answers (None: a model of this run's, answered in the stage), the reference's label in file names
    and its name. From the world: the test questions and instructions are drawn first, then the dev
    ones, each draw avoiding `seen` (every training prompt) and every earlier draw, so the splits are
    disjoint and the test split is the same whichever is scored. A file is read as it is."""
    from dalign.readers import read_alpaca_eval, read_mt_bench

    drawn = {}
    for split in ("test", "dev"):
        tag = "" if split == "test" else "-dev"  # the test draw keeps the tags it had before the dev split
        questions = make_questions(cfg.questions_per_category, cfg.seed, seen, "eval" + tag) if not cfg.mt_bench else None
        drawn[split] = questions, [text for _, text in fresh_openings(cfg.win_rate_instructions // 8, cfg.seed,
                                                                     "winrate" + tag, seen)]
        if split == cfg.split:
            break
    questions, instructions = drawn[cfg.split]
    if cfg.mt_bench:
        questions = read_mt_bench(cfg.mt_bench)
    if cfg.alpaca_eval is not None:
        rows = read_alpaca_eval(cfg.alpaca_eval)
        reference = ([r["instruction"] for r in rows], [r["output"] for r in rows], "reference",
                     rows[0]["generator"] if rows else None)
    else:
        label = "sft" if "sft" in models else next(iter(models))
        reference = (instructions, None, label, label)
    return questions, reference


MT_BENCH_KEYS = ("score", "ci95", "categories", "judge_failures", "questions")
CORRECTNESS_KEYS = ("first_turn_correct", "greedy_accuracy", "pass_at_k")
WIN_RATE_KEYS = ("win_rate", "ci95", "length_controlled_win_rate", "wins", "ties", "losses", "judge_failures")


def _once(path: Path, compute) -> dict:
    """A result written whole the first time; a rerun after a kill reads it instead."""
    if not path.exists():
        write_json(path, compute(), indent=1)
    return json.loads(path.read_text())


def stage(recipe, out: Path, inputs: dict[str, Path], split: str | None = None) -> dict:
    """The `evaluate` stage, for every model of the run (the start, dSFT, each dDPO variant):
    MT-Bench-style grades by roles.judge (with greedy accuracy and pass@k when the judge tells
    right from wrong, as the world's does); the win rate by roles.comparer against the
    reference answers; each variant's held-out reward accuracy; multiple choice when asked.
    `split`: the stage name's suffix (evaluate-dev), which says what evaluate.split says."""
    from dalign import roles
    from dalign.completions import seen_prompts
    from dalign.winrate import win_rate

    cfg, paths = recipe.evaluate, roles.models(recipe, inputs)
    models = {("base" if recipe.world_start else "start"): paths["start"],
              **{k: v for k, v in paths.items() if k.split("-")[0] in ("sft", "dpo")}}
    seen, parts = seen_prompts(inputs), {"mt_bench", "win_rate", "reward_accuracy"} - set(cfg.skip)
    questions, (instructions, reference, ref_label, ref_name) = held_out(cfg, models, seen)
    judge, comparer = (roles.backend(recipe, role, inputs, out) if part in parts else None
                       for role, part in (("judge", "mt_bench"), ("comparer", "win_rate")))
    correctness = recipe.roles.judge.world is not None
    greedy, summary = Sampling(0.0, cfg.max_new_tokens, cfg.seed), {label: {} for label in models}
    # Under a multi-process launch each process evaluates whole models (model i on rank i % processes),
    # so every model's answers come out as in one process; a barrier ends each phase.
    rank, world = rank_and_world()
    mine = [label for i, label in enumerate(models) if i % world == rank]
    split_pairs = inputs["pairs"] / f"{cfg.split}.jsonl"  # the split's pairs (read pairs have no dev split)
    has_pairs = "reward_accuracy" in parts and split_pairs.exists() and bool(read_rows(split_pairs))  # read once
    scored = [k for k in models if k.startswith("dpo-") and has_pairs]
    # One bar over this process's jobs: each model's answers and grades, win rate, reward accuracy, multiple choice.
    jobs = len(mine) * (("mt_bench" in parts) + 2 * ("win_rate" in parts) + (cfg.mc is not None)) \
        - ("win_rate" in parts and ref_label in mine) + len([x for x in mine if x in scored])
    bar = Progress(out.name, jobs, "jobs")

    for label in mine:
        model = None  # loaded only for what a rerun has not written yet

        def get():
            nonlocal model
            if model is None:
                model = roles.local(recipe, models[label], inputs, label, cfg.batch_size)
            return model

        if "mt_bench" in parts:
            bar.postfix(job=f"{label} MT-Bench")
            _once(out / f"{label}.json",
                  lambda: {**evaluate_mt_bench(get(), judge, questions, cfg, correctness), "generation": get().throughput()})
            bar.update()
        if "win_rate" in parts:
            bar.postfix(job=f"{label} answers")
            _once(out / f"answers_{label}.json",
                  lambda: get().generate([[{"role": "user", "content": i}] for i in instructions], greedy))
            bar.update()
    barrier()
    if "mt_bench" in parts:
        for label in models:
            result = json.loads((out / f"{label}.json").read_text())
            summary[label] = {k: result[k] for k in MT_BENCH_KEYS + (CORRECTNESS_KEYS if correctness else ())}
    if "win_rate" in parts:
        if reference is None:
            reference = json.loads((out / f"answers_{ref_label}.json").read_text())
        for label in (x for x in mine if x != ref_label):
            bar.postfix(job=f"{label} win rate")
            answers = json.loads((out / f"answers_{label}.json").read_text())
            _once(out / f"win_rate_{label}_vs_{ref_label}.json", lambda: win_rate(instructions, answers, reference, comparer))
            bar.update()
    for label in (x for x in mine if x in scored):
        bar.postfix(job=f"{label} reward accuracy")
        start = json.loads((inputs[label] / "manifest.json").read_text())["reference"]
        beta = recipe.dpo_for(next(v for v in recipe.variants if f"dpo-{v.name}" == label)).beta
        _once(out / f"reward_accuracy_{label}.json", lambda: reward_accuracy(
            models[label], start, split_pairs, beta, recipe.dpo.max_length))
        bar.update()
    if cfg.mc is not None:
        from dalign.mc import MCConfig, run_mc

        for label in mine:
            bar.postfix(job=f"{label} multiple choice")
            if not (out / f"mc_{label}" / "mc.json").exists():
                run_mc(MCConfig(model=str(models[label]), **cfg.mc), out / f"mc_{label}", bars=False)
            bar.update()
    bar.close()
    barrier()
    for label in models:
        if "win_rate" in parts and label != ref_label:
            result = json.loads((out / f"win_rate_{label}_vs_{ref_label}.json").read_text())
            summary[label]["win_rate"] = {k: result[k] for k in WIN_RATE_KEYS}
        if label in scored:
            summary[label]["reward_accuracy"] = json.loads((out / f"reward_accuracy_{label}.json").read_text())
        if cfg.mc is not None:
            summary[label]["mc"] = json.loads((out / f"mc_{label}" / "mc.json").read_text())["results"]
    return {"seeds": {"questions_and_sampling": cfg.seed}, "split": cfg.split, "judge": judge and judge.name,
            "comparer": comparer and comparer.name,
            "reference": ref_name, "results": summary,
            "rows": {k: n for k, n, part in (("questions", len(questions), "mt_bench"),
                                             ("win_rate_instructions", len(instructions), "win_rate")) if part in parts},
            **roles.usage([b for b in (judge, comparer) if b is not None])}
