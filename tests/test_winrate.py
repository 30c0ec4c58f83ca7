"""Win rate: both orders judged, position bias turned into ties, length control."""

import math

import pytest

from dalign.backends import Sampling
from dalign.winrate import VerdictParseError, length_controlled, parse_verdict, read_comparison_prompt, win_rate, comparison_prompt
from dalign.world.judge import WorldComparer

QUESTIONS = [f"What is {a} plus {b}? Answer in one sentence." for a in range(5) for b in range(4)]
RIGHT = [f"{a} plus {b} is {a + b}." for a in range(5) for b in range(4)]
WRONG = [f"{a} plus {b} is {a + b + 1}." for a in range(5) for b in range(4)]


class AlwaysFirst:
    name = "always-first"

    def generate(self, conversations, sampling=Sampling()):
        return ["The first one reads well.\nPreferred: (a)"] * len(conversations)


def test_a_judge_that_always_prefers_the_first_position_yields_ties_not_wins():
    result = win_rate(QUESTIONS, RIGHT, WRONG, AlwaysFirst())
    assert result["ties"] == len(QUESTIONS) and result["wins"] == result["losses"] == 0
    assert result["win_rate"] == 0.5


def test_the_world_comparer_prefers_right_answers_in_both_orders():
    better = win_rate(QUESTIONS, RIGHT, WRONG, WorldComparer())
    assert better["wins"] == len(QUESTIONS) and better["win_rate"] == 1.0 and better["ci95"] == 0.0
    worse = win_rate(QUESTIONS, WRONG, RIGHT, WorldComparer())
    assert worse["win_rate"] == 0.0
    same = win_rate(QUESTIONS, RIGHT, RIGHT, WorldComparer())
    assert same["win_rate"] == 0.5 and same["ties"] == len(QUESTIONS)


def test_mixed_outcomes_give_an_interval():
    half = RIGHT[:10] + WRONG[10:]
    result = win_rate(QUESTIONS, half, [RIGHT[i] if i >= 10 else WRONG[i] for i in range(20)], WorldComparer())
    assert result["win_rate"] == 0.5 and result["wins"] == result["losses"] == 10
    # sd of ten 1s and ten 0s is 0.5130; 1.96 * 0.5130 / sqrt(20) = 0.2248
    assert result["ci95"] == pytest.approx(0.2248, abs=1e-3)


def test_the_prompt_round_trips():
    request = comparison_prompt("Say hi.", "Hi.", "Hello there.")
    assert read_comparison_prompt(request[0]["content"]) == ("Say hi.", "Hi.", "Hello there.")


@pytest.mark.parametrize("reply", ["I like (a).", "Preferred: (a)\nOn reflection, both are fine.", "Preferred: (c)"])
def test_verdicts_parse_strictly(reply):
    with pytest.raises(VerdictParseError):
        parse_verdict(reply)


def test_length_control_removes_a_pure_length_effect():
    # Quality is equal; only length matters: the longer answer wins 90% of the time. The
    # model's answer is the longer one in 80% of the items, which lifts its raw win rate to
    # 0.8 * 0.9 + 0.2 * 0.1 = 0.74; at equal length it would win half the time.
    diffs = [10] * 80 + [-10] * 20
    outcomes = [1.0] * 72 + [0.0] * 8 + [1.0] * 2 + [0.0] * 18
    assert sum(outcomes) / len(outcomes) == pytest.approx(0.74)
    assert length_controlled(outcomes, diffs) == pytest.approx(0.5, abs=1e-6)
    # With no length difference at all, the controlled rate is the raw rate.
    assert length_controlled([1.0] * 7 + [0.0] * 3, [0] * 10) == pytest.approx(0.7, abs=1e-6)


class GarblesFirstTries:
    """Answers 'Preferred: (a)' only from its `good_from`-th attempt (seed) on; before that, prose."""
    name = "garbler"

    def __init__(self, good_from: int):
        self.good_from, self.seeds = good_from, []

    def generate(self, conversations, sampling=Sampling()):
        self.seeds.append(sampling.seed)
        ok = sampling.seed >= self.good_from
        return ["Preferred: (a)" if ok else "Both are fine, I think."] * len(conversations)


def test_an_unparseable_verdict_is_asked_again_then_counted_with_its_raw_reply():
    judge = GarblesFirstTries(good_from=1)
    result = win_rate(QUESTIONS[:4], RIGHT[:4], WRONG[:4], judge, retries=1)
    assert judge.seeds == [0, 1] and result["judge_retries"] == 8 and result["judge_failures"] == 0
    assert result["ties"] == 4  # it always prefers (a): position bias, so ties
    never = win_rate(QUESTIONS[:4], RIGHT[:4], WRONG[:4], GarblesFirstTries(good_from=9), retries=2)
    assert never["judge_failures"] == 4 and never["items"] == [] and never["win_rate"] != never["win_rate"]  # nan
    assert never["failed"][0]["raw"] == ["Both are fine, I think."] * 2


def test_the_length_controlled_rate_of_a_model_that_loses_or_wins_everything():
    """No finite logistic fit exists: the rate is the one outcome (the ablation's fit overflowed here)."""
    diffs = [float(i) for i in range(-20, 20)]
    assert length_controlled([0.0] * 40, diffs) == 0.0
    assert length_controlled([1.0] * 40, diffs) == 1.0
    separated = [1.0 if d > 0 else 0.0 for d in diffs]  # wins exactly where it is longer: the fit runs off
    assert length_controlled(separated, diffs) is None  # no estimate, not a runaway fit's 0 or 1
    mixed = [1.0 if i % 3 else 0.0 for i in range(40)]  # outcomes that do not separate: a finite fit
    rate = length_controlled(mixed, diffs)
    assert rate is not None and 0.5 < rate < 0.8 and math.isfinite(rate)
