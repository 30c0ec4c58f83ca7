"""Stage 3 (world): MT-Bench-style evaluation, plus greedy accuracy and pass@k.

Two-turn questions per category in MT-Bench's question format, answered by the model at
MT-Bench's per-category temperatures (turn two sees the model's own first answer), and
graded 1-10 per turn by the judge. Every answer and judgment is kept in the output.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Sequence

from dalign.backends import Backend, Sampling
from dalign.config import EvalConfig
from dalign.judging import JudgeParseError, parse_judgment
from dalign.prompted import REFERENCE_PREFIX
from dalign.world import CATEGORIES
from dalign.world.roles import WorldTeacher, WorldUser, fresh_openings


NEEDS_REFERENCE = ("math", "reasoning", "coding")  # as in FastChat's llm_judge


def make_questions(per_category: int, seed: int, exclude: set[str]) -> list[dict]:
    """Held-out two-turn questions in MT-Bench's format, with the teacher's reference answers."""
    user, reference = WorldUser(seed=seed), WorldTeacher()
    rows = []
    for category, first in fresh_openings(per_category, seed, "eval", exclude):
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
