"""The remote stages against a fault storm: AI-feedback ratings, the MT-Bench judge and the
win-rate comparer, each with its role played by an OpenAIBackend behind a local server
(test_openai_backend.ScriptedServer) that answers 429 with Retry-After, 500, too slowly,
broken JSON and no choices before answering, and never answers some requests.

For each stage: every row ends parsed (with exactly what the server said) or counted as
failed, and a row fails exactly when one of its requests was never answered; the backend
retried each fault kind; a rerun with the same cache asks the server only what it never answered.
"""

from __future__ import annotations

import json
import time

import pytest

from dalign.backends import Sampling
from dalign.config import EvalConfig
from dalign.data import read_rows
from dalign.evaluate import _reference, evaluate_mt_bench
from dalign.openai_backend import OpenAIBackend
from dalign.prompted import PromptedJudge, template
from dalign.rate import rating_prompt, read_rating_prompt, run_rating
from dalign.winrate import comparison_prompt, read_comparison_prompt, win_rate
from dalign.world import CATEGORIES
from test_openai_backend import ScriptedServer, completion, config, make_handler, serving

# Each new request text gets the next plan of the cycle; the last action repeats forever, so the
# ["500"] rows are never answered. "ok:3" answers after the client's timeout has passed. A cycle
# of 7 does not divide the comparer's 24 requests, so some instructions lose one order only.
PLANS = [["429:0.05", "ok"], ["500", "ok"], ["500"], ["ok:3", "ok"], ["malformed", "ok"], ["nochoices", "ok"], ["500"]]
TIMEOUT_S = 1.5  # generous next to a plain answer, so that a loaded machine adds no timeout of its own
ATTEMPTS = 3  # max_retries=2
JUDGE_OPENING = template("judge_single.txt").splitlines()[0]


class StormServer(ScriptedServer):
    """Plans dealt out in order of first arrival (so every fault kind is met whatever the rows'
    texts), and answers written in the format of the stage that asked."""

    def __init__(self):
        super().__init__()
        self.doomed: set[str] = set()
        self.script = self.deal

    def deal(self, row: str) -> list[str]:  # called under self.lock, once per new row
        plan = PLANS[len(self.plans) % len(PLANS)]
        if plan == ["500"]:
            self.doomed.add(row)
        return list(plan)

    @staticmethod
    def answer(row: str) -> str:
        if row.startswith(JUDGE_OPENING):
            return "A fair answer, if brief.\nRating: [[7]]"
        if (rating := read_rating_prompt(row)) is not None:
            return "\n".join(f"Response {k}\n" + "".join(f"{a}: {aspect_value(text)}\n" for a in ASPECT_LABELS)
                             + "Rationale: scripted." for k, text in enumerate(rating[1], 1))
        if (comparison := read_comparison_prompt(row)) is not None:
            _, a, b = comparison
            return "The shorter one says it plainly.\nPreferred: " + ("(a)" if len(a) < len(b) else "(b)")
        raise AssertionError(f"no stage asks this: {row[:80]!r}")


ASPECT_LABELS = ("Instruction-following", "Honesty", "Truthfulness", "Helpfulness")


def aspect_value(text: str) -> int:
    return 1 + len(text) % 5


def answering_handler(server: StormServer):
    class Handler(make_handler(server)):
        def act(self, action: str, row: str, request: dict):
            kind, _, arg = action.partition(":")
            if kind != "ok":  # the faults, as ScriptedServer plays them
                return super().act(action, row, request)
            time.sleep(float(arg or 0))
            self.send(200, json.dumps(completion(server.answer(row))).encode())

    return Handler


@pytest.fixture
def server():
    scripted = StormServer()
    with serving(scripted, answering_handler(scripted)):
        yield scripted


# Each stage runs with its role behind `backend`, writing into `out`, and returns one
# (request texts, parsed) per row and the number of rows the stage itself counts as failed.
# Its `asks` is how many times the stage asks the backend for a row that keeps failing.

def rating_stage(backend, out):
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} plus 3?"}],
             "completions": [{"model": f"m{k}", "text": t} for k, t in
                             enumerate([f"{i + 3}.", f"It is {i + 3}.", f"{i} plus 3 is {i + 3}, as counted."])]}
            for i in range(12)]
    summary = run_rating(rows, backend, retries=1, chunk_size=4, seed=0, out=out)
    outcomes = []
    for row in read_rows(out / "ratings.jsonl"):
        request = rating_prompt(row["prompt"], [row["completions"][k]["text"] for k in row["rating_order"]])
        scores = [c["score"] for c in row["completions"]]
        if scores[0] is not None:  # parsed: exactly the server's ratings, mapped back through the shuffle
            assert scores == [aspect_value(c["text"]) for c in row["completions"]]
        else:
            assert set(scores) == {None} and "no reply" in row["rating_error"]
        outcomes.append(([request[0]["content"]], scores[0] is not None))
    assert summary["rows"]["kept"] == sum(ok for _, ok in outcomes)
    return outcomes, summary["rows"]["dropped"]["rating_failed"]


rating_stage.asks = 2  # retries=1


class Answerer:
    name = "answerer"

    def generate(self, conversations, sampling=Sampling()):
        return [f"My answer to {c[-1]['content']!r}, turn {len(c) // 2 + 1}." for c in conversations]


QUESTIONS = [{"question_id": i + 1, "category": c, "turns": [f"Question {i}: tell me about {c}.", "And in one line?"],
              "reference": [f"Reference {i}.", f"Reference {i}, shorter."]} for i, c in enumerate(list(CATEGORIES)[:6])]


def judge_stage(backend, out):
    judge = PromptedJudge(backend)
    result = evaluate_mt_bench(Answerer(), judge, QUESTIONS, EvalConfig(seed=0), correctness=False)
    outcomes = []
    for q, row in zip(QUESTIONS, result["answers"]):
        conv = []
        for turn, (question, answer, judgment) in enumerate(zip(q["turns"], row["answers"], row["judgments"])):
            conv += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            assert judgment["score"] in (7.0, None)  # the server's rating, or none
            outcomes.append(([judge.request(_reference(q, turn) + conv)], judgment["score"] is not None))
    return outcomes, result["judge_failures"]


judge_stage.asks = 1  # the judge's reply is not asked again


INSTRUCTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(3)]
SHORT = [f"{a + b}." for a in range(4) for b in range(3)]
LONG = [f"Counting on from {a}, {b} more makes {a + b}." for a in range(4) for b in range(3)]


def comparer_stage(backend, out):
    result = win_rate(INSTRUCTIONS, SHORT, LONG, backend, retries=1)
    parsed = {it["instruction"]: it for it in result["items"]}
    assert all(it["verdicts"] == ["a", "b"] and it["outcome"] == 1.0 for it in parsed.values())
    assert all(None in f["raw"] for f in result["failed"])
    outcomes = [([comparison_prompt(i, m, r)[0]["content"], comparison_prompt(i, r, m)[0]["content"]], i in parsed)
                for i, m, r in zip(INSTRUCTIONS, SHORT, LONG)]
    assert result["wins"] == len(parsed)
    return outcomes, result["judge_failures"]


comparer_stage.asks = 2  # retries=1


@pytest.mark.parametrize("stage", [rating_stage, judge_stage, comparer_stage], ids=["rater", "judge", "comparer"])
def test_a_remote_stage_against_a_fault_storm_accounts_for_every_row(server, tmp_path, stage):
    cfg = config(server.url, max_retries=ATTEMPTS - 1, timeout_s=TIMEOUT_S, cache_dir=str(tmp_path / "cache"))
    backend = OpenAIBackend(cfg, name="remote")
    outcomes, failed = stage(backend, tmp_path / "a")
    parsed = sum(ok for _, ok in outcomes)
    assert len(outcomes) == 12 and parsed + failed == 12  # never lost
    # Never guessed: a row fails exactly when one of its requests was never answered.
    assert [ok for _, ok in outcomes] == [not server.doomed & set(texts) for texts, _ in outcomes]
    assert 0 < failed < 12
    usage = backend.usage()
    assert all(usage["retries"][r] > 0 for r in ("429", "5xx", "timeout", "malformed")), usage["retries"]
    assert usage["failures"] == len(server.doomed) * stage.asks
    requested = {t for texts, _ in outcomes for t in texts}
    answered = {e["row"] for e in server.log if e["action"] == "ok"}
    assert {e["row"] for e in server.log} == requested and answered == requested - server.doomed

    # A rerun into a fresh folder, with the same cache, asks the server only what it never answered.
    before = len(server.log)
    rerun = OpenAIBackend(cfg, name="remote")
    assert stage(rerun, tmp_path / "b") == (outcomes, failed)
    sent = server.log[before:]
    assert {e["row"] for e in sent} == server.doomed
    assert rerun.usage()["requests"] == len(sent) == len(server.doomed) * ATTEMPTS * stage.asks
    assert rerun.usage()["cache_hits"] == len(answered)
    print(f"\n{stage.__name__}: rows={len(outcomes)} parsed={parsed} failed={failed} requests={usage['requests']} "
          f"retries={usage['retries']} failures={usage['failures']} rerun_requests={len(sent)} "
          f"rerun_cache_hits={rerun.usage()['cache_hits']}")
