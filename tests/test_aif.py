"""AI feedback: ensemble completions (resumable) and the teacher's ratings (strict, retried, counted)."""

import pytest

from dalign.backends import Sampling
from dalign.completions import Member, run_completions
from dalign.data import read_rows
from dalign.rate import RatingParseError, parse_ratings, rate_prompts, rating_prompt, read_rating_prompt
from dalign.world.judge import WorldRater
from dalign.world.roles import Flaws, WorldTeacher, WorldUser, seed_topics

GOOD = "3 plus 5 is 8."


def prompts(n):
    user = WorldUser()
    return [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": user.ask([{"role": "system", "content": t}])}]}
            for i, t in enumerate(seed_topics(n, 3))]


def row(texts, prompt="What is 3 plus 5? Answer in one sentence.", pid="p"):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": prompt}],
            "completions": [{"model": f"m{i}", "text": t} for i, t in enumerate(texts)]}


class Scripted:
    """A rater that replies from a script, then delegates to the world rater."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.calls, self.world = list(replies), [], WorldRater()

    def generate(self, conversations, sampling=Sampling()):
        self.calls.append((len(conversations), sampling.temperature))
        return [self.replies.pop(0) if self.replies else self.world.generate([c])[0] for c in conversations]


def test_the_rating_prompt_round_trips_and_the_world_rater_orders_by_quality():
    texts = [GOOD, "3 plus 5 is 9.", "", GOOD + " I hope this helps you. Let me know if you have other questions."]
    request = rating_prompt(row(texts)["prompt"], texts)
    assert read_rating_prompt(request[0]["content"]) == ("What is 3 plus 5? Answer in one sentence.", texts)
    rated, counts = rate_prompts([row(texts)], WorldRater(), retries=1, seed=0)
    scores = [c["score"] for c in rated[0]["completions"]]
    assert scores[0] == 5.0 and scores[0] > scores[3] > scores[1]
    # The empty answer is not shown to the rater: no score, and counted.
    assert scores[2] is None and rated[0]["completions"][2]["rationale"] == "not rated: the answer is empty"
    assert counts == {"not_rated:empty_completion": 1} and len(rated[0]["rating_order"]) == 3


def test_ratings_map_back_through_the_shuffle():
    texts = [GOOD, "3 plus 5 is 9.", "3 plus 5 is 7.", "3 plus 5 is 6."]
    orders = set()
    for seed in range(6):
        rated, _ = rate_prompts([row(texts)], WorldRater(), retries=0, seed=seed)
        orders.add(tuple(rated[0]["rating_order"]))
        assert [c["score"] for c in rated[0]["completions"]][0] == 5.0  # whatever order they were shown in
        assert all(c["score"] < 5.0 for c in rated[0]["completions"][1:])
    assert len(orders) > 1


@pytest.mark.parametrize("reply", [
    "",
    "Response 1\nInstruction-following: 5\nHonesty: 5\nTruthfulness: 5\nRationale: ok",  # an aspect missing
    "Response 1\nInstruction-following: 6\nHonesty: 5\nTruthfulness: 5\nHelpfulness: 5",  # out of range
    "Response 2\nInstruction-following: 5\nHonesty: 5\nTruthfulness: 5\nHelpfulness: 5",  # wrong number
    "Response 1\nInstruction-following: good\nHonesty: 5\nTruthfulness: 5\nHelpfulness: 5",
])
def test_strict_parser_refuses(reply):
    with pytest.raises(RatingParseError):
        parse_ratings(reply, 1)


def test_n_a_is_skipped_in_the_mean():
    reply = "Response 1\nInstruction-following: 4\nHonesty: N/A\nTruthfulness: 5\nHelpfulness: 3\nRationale: fine."
    assert parse_ratings(reply, 1)[0]["score"] == pytest.approx(4.0)


def test_an_unparseable_reply_is_retried_then_parsed():
    rater = Scripted(["I think they are all fine."])
    rated, counts = rate_prompts([row([GOOD, "3 plus 5 is 9."])], rater, retries=2, seed=0)
    assert counts == {"retries": 1}
    assert rated[0]["rating_raw"][0] == "I think they are all fine." and len(rated[0]["rating_raw"]) == 2
    assert rated[0]["completions"][0]["score"] == 5.0 and "rating_error" not in rated[0]
    assert rater.calls == [(1, 0.0), (1, 0.7)]  # the retry samples


class Stubborn(Scripted):
    """Never gives a parseable rating for prompts about 6; rates the rest properly."""

    def generate(self, conversations, sampling=Sampling()):
        self.calls.append((len(conversations), sampling.temperature))
        return ["no" if "plus 6" in c[-1]["content"] else self.world.generate([c])[0] for c in conversations]


def test_a_reply_that_never_parses_is_counted_failed_never_guessed():
    rater = Stubborn([])
    rows = [row(["3 plus 6 is 9.", "3 plus 6 is 8."], prompt="What is 3 plus 6?", pid="bad"), row([GOOD, ""], pid="fine")]
    rated, counts = rate_prompts(rows, rater, retries=2, seed=0)
    assert rater.calls == [(2, 0.0), (1, 0.7), (1, 0.7)]  # only the failed prompt is asked again
    assert counts == {"retries": 2, "failed": 1, "not_rated:empty_completion": 1}
    bad = rated[0]
    assert all(c["score"] is None and c["ratings"] is None for c in bad["completions"])
    assert bad["rating_raw"] == ["no", "no", "no"] and "responses 1..2" in bad["rating_error"]
    assert rated[1]["completions"][0]["score"] == 5.0


def test_completions_resume_after_a_kill(tmp_path):
    class Dies(Exception):
        pass

    class Fragile(WorldTeacher):
        calls = 0

        def generate(self, conversations, sampling=Sampling()):
            Fragile.calls += 1
            if Fragile.calls == 3:
                raise Dies
            return super().generate(conversations, sampling)

    def members(cls):
        return [Member("good", cls(Flaws()), Sampling()), Member("erratic", WorldTeacher(Flaws(error=0.7)), Sampling()),
                Member("rambler", WorldTeacher(Flaws(ramble=1.0)), Sampling())]

    rows = prompts(24)
    straight = run_completions(rows, members(WorldTeacher), 2, ["helpfulness", "none"], 6, 0, tmp_path / "a")
    with pytest.raises(Dies):
        run_completions(rows, members(Fragile), 2, ["helpfulness", "none"], 6, 0, tmp_path / "b")
    assert len(list((tmp_path / "b" / "parts").glob("part-*.jsonl"))) < 4
    resumed = run_completions(rows, members(Fragile), 2, ["helpfulness", "none"], 6, 0, tmp_path / "b")
    a, b = read_rows(tmp_path / "a" / "completions.jsonl"), read_rows(tmp_path / "b" / "completions.jsonl")
    assert a == b and len({r["prompt_id"] for r in b}) == 24
    assert resumed == straight
    assert all(len(r["completions"]) == 2 and all(c["text"] and c["principle"] for c in r["completions"]) for r in b)
