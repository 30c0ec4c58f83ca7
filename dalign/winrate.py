"""AlpacaEval-style pairwise win rate, judged in both orders, with a length-controlled rate.

For each instruction the judge compares the model's answer with a reference model's,
once with the model's answer first and once second. A win counts only if the verdict
follows the answer when it moves; a verdict that follows the position (or a tie) counts
as a tie, worth half a win. This removes the judge's position bias from the score.

Length control: longer answers win more often whatever their quality. We fit a logistic
model of each outcome on the standardised length difference, tanh((len_model - len_ref)
/ sd), and report the win rate it predicts at zero length difference, in the spirit of
AlpacaEval 2's length-controlled win rate.
"""

from __future__ import annotations

import math
import re
from importlib.resources import files
from typing import Sequence

import numpy as np

from dalign.backends import Backend, Sampling
from dalign.evaluate import mean_ci
from dalign.world.task import Template

TEMPLATE = (files("dalign") / "prompts" / "compare.txt").read_text()
_VERDICT = re.compile(r"Preferred:\s*(\(a\)|\(b\)|tie)")


class VerdictParseError(ValueError):
    """A comparison reply whose last line is not 'Preferred: (a)|(b)|tie'."""


def comparison_prompt(instruction: str, output_a: str, output_b: str) -> list[dict]:
    return [{"role": "user", "content": TEMPLATE.format(instruction=instruction, output_a=output_a, output_b=output_b)}]


def read_comparison_prompt(text: str) -> tuple[str, str, str] | None:
    """The inverse of `comparison_prompt`, for judges that read the prompt as text (the world's)."""
    slots = Template(TEMPLATE.strip()).parse(text.strip())
    return (slots["instruction"], slots["output_a"], slots["output_b"]) if slots else None


def parse_verdict(text: str | None) -> str:
    """The verdict is the reply's last line, where the template asks for it; an earlier
    'Preferred:' line is the judge quoting an output (see dalign.judging.parse_judgment)."""
    if text is None:
        raise VerdictParseError("the judge gave no reply (its backend failed after retries)")
    lines = text.strip().splitlines()
    found = _VERDICT.fullmatch(lines[-1].strip()) if lines else None
    if found is None:
        raise VerdictParseError("expected 'Preferred: (a)|(b)|tie' as the reply's last line")
    return found.group(1).strip("()")


def outcome(model_first: str, model_second: str) -> float:
    """1 win, 0 loss, 0.5 tie, from the verdicts with the model's answer shown as (a), then as (b)."""
    if model_first == "a" and model_second == "b":
        return 1.0
    if model_first == "b" and model_second == "a":
        return 0.0
    return 0.5


def length_controlled(outcomes: Sequence[float], length_diffs: Sequence[float], steps: int = 500) -> float | None:
    """Win rate at zero length difference under a logistic fit on tanh(standardised difference).

    Every comparison with one outcome has no finite fit, and the rate is that outcome. Where the
    outcomes separate by length (the fit runs off to infinity instead of converging), there is no
    estimate: None, shown as '-', rather than the 0 or 1 the runaway fit would print. That case
    overflowed math.exp once: the ablation's 2-epoch dDPO model at seed 0, 90% wins. The logistic is
    written with tanh, which cannot overflow."""
    y = np.asarray(outcomes, dtype=float)
    if y.min() == y.max():
        return float(y[0])
    d = np.asarray(length_diffs, dtype=float)
    x = np.tanh(d / (d.std() or 1.0))
    theta = np.zeros(2)
    for _ in range(steps):  # Newton's method on the (soft-label) logistic likelihood
        p = 0.5 * (1 + np.tanh((theta[0] + theta[1] * x) / 2))
        grad = np.array([(y - p).sum(), ((y - p) * x).sum()])
        w = p * (1 - p) + 1e-9
        hess = np.array([[w.sum(), (w * x).sum()], [(w * x).sum(), (w * x * x).sum()]]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    else:
        return None  # no convergence: a runaway fit
    if not np.isfinite(theta).all() or abs(theta[0]) > 30:  # the intercept ran off: the outcomes separate
        return None
    return float(0.5 * (1 + math.tanh(theta[0] / 2)))


def _verdicts(judge: Backend, requests: list[list[dict]], retries: int) -> tuple[list, list, int]:
    """Each request's verdict (None if it never parsed) and last raw reply; a reply that does not
    parse is asked again, sampled with a new seed (a cached greedy reply would repeat itself)."""
    verdicts, raws, asked = [None] * len(requests), [None] * len(requests), 0
    pending = list(range(len(requests)))
    for attempt in range(retries + 1):
        if not pending:
            break
        asked += len(pending) if attempt else 0
        replies = judge.generate([requests[i] for i in pending], Sampling(0.0 if attempt == 0 else 0.7, 512, attempt))
        for i, reply in zip(pending, replies):
            raws[i] = reply
            try:
                verdicts[i] = parse_verdict(reply)
            except VerdictParseError:
                pass
        pending = [i for i in pending if verdicts[i] is None]
    return verdicts, raws, asked


def win_rate(instructions: Sequence[str], model_answers: Sequence[str], reference_answers: Sequence[str],
             judge: Backend, retries: int = 1) -> dict:
    first = [comparison_prompt(i, m, r) for i, m, r in zip(instructions, model_answers, reference_answers)]
    second = [comparison_prompt(i, r, m) for i, m, r in zip(instructions, model_answers, reference_answers)]
    verdicts, replies, retried = _verdicts(judge, first + second, retries)
    items, failed = [], []
    for k, instruction in enumerate(instructions):
        v1, v2 = verdicts[k], verdicts[len(instructions) + k]
        raw = [replies[k], replies[len(instructions) + k]]
        if v1 is None or v2 is None:  # counted and kept with the raw replies, never guessed
            failed.append({"instruction": instruction, "raw": raw})
            continue
        items.append({"instruction": instruction, "model": model_answers[k], "reference": reference_answers[k],
                      "verdicts": [v1, v2], "outcome": outcome(v1, v2), "raw": raw})
    failures = len(failed)
    outcomes = [it["outcome"] for it in items]
    rate, half = mean_ci(outcomes)
    diffs = [len(it["model"].split()) - len(it["reference"].split()) for it in items]
    return {"win_rate": rate, "ci95": half, "length_controlled_win_rate": length_controlled(outcomes, diffs) if items else None,
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
            "judge_failures": failures, "judge_retries": retried, "judge": judge.name, "items": items, "failed": failed}
