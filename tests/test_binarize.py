"""Each binarization rule on hand-made rated rows, ties included."""

from collections import Counter

import pytest

from dalign.binarize import Rejection, binarize, binarize_row, split_of


def rated(prompt_id, scores):
    return {"prompt_id": prompt_id, "prompt": [{"role": "user", "content": f"question {prompt_id}"}],
            "completions": [{"text": f"answer {i}", "model": f"m{i}", "score": s} for i, s in enumerate(scores)]}


def texts(pair):
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def test_chosen_is_the_best_and_random_rejects_any_other():
    seen = Counter()
    for seed in range(200):
        pair, _ = binarize_row(rated("p", [2.0, 4.5, 3.0, 1.0]), Rejection.RANDOM, seed)
        chosen, rejected = texts(pair)
        assert chosen == "answer 1" and pair["score_chosen"] == 4.5
        seen[rejected] += 1
    assert set(seen) == {"answer 0", "answer 2", "answer 3"}  # every other completion gets picked


def test_random_keeps_ties_with_the_chosen():
    pair, reason = binarize_row(rated("p", [3.0, 3.0, 3.0, 3.0]), Rejection.RANDOM, 0)
    assert reason is None and pair["score_chosen"] == pair["score_rejected"] == 3.0
    assert texts(pair)[0] != texts(pair)[1]


def test_random_lower_only_picks_strictly_lower_and_drops_all_ties():
    for seed in range(100):
        pair, _ = binarize_row(rated("p", [4.0, 4.0, 2.0, 4.0]), Rejection.RANDOM_LOWER, seed)
        assert texts(pair)[1] == "answer 2" and pair["score_rejected"] == 2.0
    assert binarize_row(rated("p", [3.5, 3.5, 3.5]), Rejection.RANDOM_LOWER, 0) == (None, "all_tied")


def test_worst_picks_the_lowest():
    for seed in range(50):
        pair, _ = binarize_row(rated("p", [3.0, 1.5, 5.0, 1.5]), Rejection.WORST, seed)
        assert texts(pair)[0] == "answer 2" and pair["score_rejected"] == 1.5
    assert binarize_row(rated("p", [2.0, 2.0]), Rejection.WORST, 0) == (None, "all_tied")


def test_unrated_completions_are_left_out_and_counted():
    row = rated("p", [None, 4.0, None])
    assert binarize_row(row, Rejection.RANDOM, 0) == (None, "fewer_than_two_rated")
    pair, _ = binarize_row(rated("q", [None, 4.0, 2.0]), Rejection.RANDOM, 0)
    assert texts(pair) == ("answer 1", "answer 2")


def test_rows_are_in_trl_conversational_format_and_the_split_is_seeded():
    rows = [rated(f"p{i}", [1.0, 2.0 + i % 3, 3.0]) for i in range(400)]
    splits, dropped = binarize(rows, Rejection.RANDOM, seed=7, test_fraction=0.1)
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 400 and not dropped and not splits["dev"]
    assert 20 <= len(test) <= 60  # about 10%
    again, _ = binarize(list(reversed(rows)), Rejection.RANDOM, seed=7, test_fraction=0.1)
    assert {r["prompt_id"] for r in test} == {r["prompt_id"] for r in again["test"]}  # order does not matter
    assert all(split_of(r["prompt_id"], 0.1, 0.0, 7) == "test" for r in test)
    row = train[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert row["score_chosen"] >= row["score_rejected"]


@pytest.mark.parametrize("rule", list(Rejection))
def test_rules_count_their_drops(rule):
    rows = [rated("a", [2.0, 2.0]), rated("b", [1.0, 3.0]), rated("c", [5.0])]
    splits, dropped = binarize(rows, rule, seed=0, test_fraction=0.0)
    assert len(splits["train"]) == (2 if rule.allows_ties else 1)
    expected = Counter({"fewer_than_two_rated": 1}) + (Counter() if rule.allows_ties else Counter({"all_tied": 1}))
    assert dropped == expected


def test_a_dev_split_comes_out_of_training_and_leaves_the_test_split_as_it_was():
    rows = [rated(f"p{i}", [1.0, 3.0]) for i in range(600)]
    without, _ = binarize(rows, Rejection.RANDOM, seed=3, test_fraction=0.1)
    splits, _ = binarize(rows, Rejection.RANDOM, seed=3, test_fraction=0.1, dev_fraction=0.1)
    ids = {k: {r["prompt_id"] for r in v} for k, v in splits.items()}
    assert ids["test"] == {r["prompt_id"] for r in without["test"]}
    assert 30 <= len(ids["dev"]) <= 90 and not ids["dev"] & ids["test"] and not ids["dev"] & ids["train"]
    assert ids["train"] | ids["dev"] == {r["prompt_id"] for r in without["train"]}


def test_rejection_all_pairs_the_chosen_with_every_lower_rated_completion():
    from dalign.binarize import pairs_of_row

    row = rated("p", [2.0, 4.5, 3.0, 4.5, 1.0])
    pairs, reason = pairs_of_row(row, Rejection.ALL, 0)
    chosen, _ = binarize_row(row, Rejection.WORST, 0)  # the same seeded pick of the chosen among the 4.5s
    assert reason is None and [p["score_rejected"] for p in pairs] == [2.0, 3.0, 1.0]  # not the tied 4.5
    assert {p["chosen"][0]["content"] for p in pairs} == {chosen["chosen"][0]["content"]}
    assert pairs_of_row(rated("q", [3.0, 3.0]), Rejection.ALL, 0) == ([], "all_tied")
    rows = [rated(f"p{i}", [1.0, 2.0, 3.0, 4.0]) for i in range(40)]
    splits, dropped = binarize(rows, Rejection.ALL, seed=7, test_fraction=0.25)
    assert sum(map(len, splits.values())) == 3 * 40 and not dropped
    by_split = {s: {p["prompt_id"] for p in pairs} for s, pairs in splits.items()}
    assert not by_split["train"] & by_split["test"]  # a prompt's pairs stay together
    with pytest.raises(ValueError, match="pairs_of_row"):
        binarize_row(row, Rejection.ALL, 0)
