"""A remote backend that gives up on a row returns None for it; every stage counts such a row
as failed, by role, and keeps going: no row is lost, none is guessed."""

from __future__ import annotations

from dalign.backends import Sampling
from dalign.binarize import Rejection, binarize
from dalign.completions import Member, run_completions
from dalign.config import DialoguesConfig
from dalign.data import read_rows
from dalign.generate import run_dialogues
from dalign.rate import run_rating
from dalign.world.judge import WorldRater
from dalign.world.roles import Flaws, WorldTeacher, WorldUser


class Flaky:
    """Wraps a backend and fails (returns None) on every conversation whose text hashes odd
    under `salt`: deterministic, so a test knows which rows fail."""

    def __init__(self, inner, salt: str):
        self.inner, self.salt, self.name = inner, salt, f"flaky-{inner.name}"

    def fails(self, conv) -> bool:
        return sum(map(ord, self.salt + str(conv))) % 3 == 0

    def generate(self, conversations, sampling=Sampling()):
        replies = self.inner.generate(conversations, sampling)
        return [None if self.fails(c) else r for c, r in zip(conversations, replies)]


def test_dialogues_count_failed_teacher_and_user_calls(world_tokenizer, tmp_path):
    cfg = DialoguesConfig(n_dialogues=60, chunk_size=16, max_turns=3)
    summary = run_dialogues(cfg, world_tokenizer, Flaky(WorldUser(), "u"), Flaky(WorldTeacher(), "t"), tmp_path)
    dropped = summary["rows"]["dropped"]
    assert dropped.get("teacher_failed", 0) > 0 and dropped.get("user_simulator_failed", 0) > 0
    assert summary["rows"]["kept"] + sum(dropped.values()) == 60
    rows = read_rows(tmp_path / "dialogues.jsonl")
    assert all(m["content"] for r in rows for m in r["messages"])


def test_failed_completions_are_counted_and_not_rated(tmp_path):
    prompts = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": q}]}
               for i, q in enumerate(["What is 2 plus 3?", "What is 7 minus 4?", "What is 6 times 2?"] * 4)]
    members = [Member("good", WorldTeacher(Flaws()), Sampling()), Member("flaky", Flaky(WorldTeacher(Flaws(error=0.5)), "c"), Sampling()),
               Member("rambler", WorldTeacher(Flaws(ramble=1.0)), Sampling())]
    facts = run_completions(prompts, members, 3, ["none"], 5, 0, tmp_path / "c")
    rows = read_rows(tmp_path / "c" / "completions.jsonl")
    failed = sum(c["text"] is None for r in rows for c in r["completions"])
    assert failed > 0 and facts["flagged"]["failed_completion"] == failed
    run_rating(rows, WorldRater(), 0, 5, 0, tmp_path / "r")
    rated = read_rows(tmp_path / "r" / "ratings.jsonl")
    for row in rated:
        for c in row["completions"]:
            assert (c["score"] is None) == (c["text"] is None), c
    train = binarize(rated, Rejection.RANDOM, 0, 0.0)[0]["train"]
    assert len(train) == len(rows) and all(p["chosen"][0]["content"] and p["rejected"][0]["content"] for p in train)


def test_a_rater_that_fails_is_counted_as_failed(tmp_path):
    rows = [{"prompt_id": "p", "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
             "completions": [{"model": "a", "text": "5."}, {"model": "b", "text": "6."}]}]

    class Down:
        name = "down"

        def generate(self, conversations, sampling=Sampling()):
            return [None] * len(conversations)

    facts = run_rating(rows, Down(), 1, 5, 0, tmp_path)
    assert facts["rows"] == {"kept": 0, "dropped": {"rating_failed": 1}} and facts["retries"] == 1
    [row] = read_rows(tmp_path / "ratings.jsonl")
    assert "no reply" in row["rating_error"] and row["rating_raw"] == [None, None]


class Blank:
    """An ensemble member whose server answers with nothing (an empty or blank string)."""

    name = "blank"

    def generate(self, conversations, sampling=Sampling()):
        return ["" if i % 2 else "  \n" for i, _ in enumerate(conversations)]


def test_an_empty_answer_is_never_rated_nor_a_pair_and_the_pairs_read_back_for_dpo(tmp_path):
    """The chain completions -> ratings -> pairs -> dDPO's reader with a member that answers
    empty: the empty answers are counted at each stage and never become a side of a pair."""
    from dalign.data import validate_preference, write_rows

    prompts = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": q}]}
               for i, q in enumerate(["What is 2 plus 3?", "What is 7 minus 4?", "What is 6 times 2?"] * 4)]
    members = [Member("good", WorldTeacher(Flaws()), Sampling()), Member("blank", Blank(), Sampling()),
               Member("rambler", WorldTeacher(Flaws(ramble=1.0)), Sampling())]
    facts = run_completions(prompts, members, 2, ["none"], 5, 0, tmp_path / "c")
    rows = read_rows(tmp_path / "c" / "completions.jsonl")
    empty = sum(c["model"] == "blank" for r in rows for c in r["completions"])
    assert empty > 0 and facts["flagged"] == {"empty_completion": empty}
    rated_facts = run_rating(rows, WorldRater(), 0, 5, 0, tmp_path / "r")
    assert rated_facts["completions_not_rated"] == {"empty_completion": empty}
    rated = read_rows(tmp_path / "r" / "ratings.jsonl")
    # Only the non-empty answers were shown to the rater.
    assert all(len(r["rating_order"]) == sum(c["model"] != "blank" for c in r["completions"]) for r in rated)
    splits, dropped = binarize(rated, Rejection.RANDOM, 0, 0.0)
    # A prompt answered by `blank` has one answer left to rate: no pair, counted.
    with_blank = sum(any(c["model"] == "blank" for c in r["completions"]) for r in rows)
    assert dropped == {"fewer_than_two_rated": with_blank} and len(splits["train"]) == len(rows) - with_blank
    write_rows(tmp_path / "train.jsonl", splits["train"])
    assert len(read_rows(tmp_path / "train.jsonl", validate=validate_preference)) == len(rows) - with_blank
    # A ratings file from elsewhere that scored an empty answer still gives no empty side.
    scored = [{**r, "completions": [{**c, "score": c["score"] if c["score"] is not None else 5.0}
                                    for c in r["completions"]]} for r in rated]
    assert all(p["rejected"][0]["content"].strip() for p in binarize(scored, Rejection.RANDOM, 0, 0.0)[0]["train"])
