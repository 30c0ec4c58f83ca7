"""N-gram decontamination on hand-worked texts, then on the real samples against a plain recomputation."""

import collections
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from dalign.data import RowError
from dalign.decontaminate import (EvalIndex, Rule, arc_texts, decontaminate, dialogue_texts, matches, overlaps,
                                  preference_texts, prompt_texts, read_arc, words)
from dalign.readers import SourceConfig

# The real samples live beside the repository (/work/shared/data for /work/main); see their README.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data samples not found at {DATA}")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "contamination.py"

# 15 words: the(1) quick brown fox jumps over the lazy dog while the farmer sleeps(13) soundly tonight(15)
FOX = "The quick brown fox jumps over the lazy dog while the farmer sleeps soundly tonight."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair(prompt, chosen="A fine answer.", rejected="A worse answer."):
    return {"prompt_id": prompt[:8], "prompt": [user(prompt)], "chosen": [assistant(chosen)],
            "rejected": [assistant(rejected)]}


def test_words_fold_case_and_split_on_everything_but_letters_and_digits():
    assert words("Hello, WORLD! It's 3.14-ish\nsnake_case ＦＵＬＬ Straße") == [
        "hello", "world", "it", "s", "3", "14", "ish", "snake", "case", "full", "strasse"]
    assert words(" ?! -- ") == []


def test_a_13_gram_shared_across_case_and_punctuation_matches():
    index = EvalIndex.build({"stories": [FOX]})
    text = "Story: THE QUICK BROWN FOX -- jumps over the 'lazy' dog;\nwhile the farmer sleeps! The end."
    assert matches(index, text) == {"stories"}
    assert overlaps(index, text) == {"stories": ["the quick brown fox jumps over the lazy dog while the farmer sleeps"]}


def test_a_12_word_overlap_does_not_match():
    index = EvalIndex.build({"stories": [FOX]})
    assert index.rules["stories"][Rule.NGRAM] == 1
    # words 1-12 of FOX, then a different 13th word
    assert matches(index, "the quick brown fox jumps over the lazy dog while the farmer wakes") == set()
    # words 4-15, with FOX's words 1-3 nowhere before them
    assert matches(index, "A fox jumps over the lazy dog while the farmer sleeps soundly tonight") == set()
    # words 3-15: 13 of them, so it matches
    assert matches(index, "brown fox jumps over the lazy dog while the farmer sleeps soundly tonight") == {"stories"}


def test_n_is_configurable():
    # "red green blue yellow" has the trigrams (red green blue) and (green blue yellow)
    index = EvalIndex.build({"colours": ["Red, green, blue & yellow."]}, n=3)
    assert index.n == 3 and index.rules["colours"][Rule.NGRAM] == 1
    assert matches(index, "Blue yellow; GREEN-blue-YELLOW!") == {"colours"}  # (green blue yellow)
    assert matches(index, "red green, then blue yellow") == set()  # each pair, never three in a row
    # at the default n=13 the same 4-word text is too short for either, and must be equal
    assert matches(EvalIndex.build({"colours": ["Red, green, blue & yellow."]}), "Blue yellow; GREEN-blue-YELLOW!") \
        == set()


def test_short_eval_texts_match_whole_or_equal():
    rewrite = "Rewrite your previous response. Start every sentence with the letter A."  # 12 words
    larry = "Who is Larry Page?"  # 4 words, under min_words=8
    index = EvalIndex.build({"mt_bench": [rewrite], "alpaca_eval": [larry]})
    assert index.rules["mt_bench"][Rule.CONTAINED] == 1 and index.rules["alpaca_eval"][Rule.EQUAL] == 1
    # 8..12 words: all of them, contiguous, anywhere in the training text
    assert matches(index, "Please rewrite your previous response: start every sentence with the letter 'a', thanks.") \
        == {"mt_bench"}
    assert matches(index, "Rewrite your previous response. Start every sentence with the letter B.") == set()
    assert matches(index, "Rewrite your previous response. Start every sentence with a letter A.") == set()
    # under 8 words: only an equal training text
    assert matches(index, "who is LARRY page") == {"alpaca_eval"}
    assert matches(index, "Who is Larry Page? Tell me about his career at Google.") == set()
    assert matches(index, "Larry Page") == set()
    # min_words moves the line: at 4 the question is matched by containment too
    index4 = EvalIndex.build({"alpaca_eval": [larry]}, min_words=4)
    assert index4.rules["alpaca_eval"][Rule.CONTAINED] == 1
    assert matches(index4, "Who is Larry Page? Tell me about his career at Google.") == {"alpaca_eval"}


def test_texts_without_words_are_counted_and_never_match():
    index = EvalIndex.build({"odd": ["???", FOX], "empty": []})
    assert index.rules["odd"][Rule.NO_WORDS] == 1 and index.rules["odd"][Rule.NGRAM] == 1
    assert sum(index.rules["empty"].values()) == 0 and index.names == ("odd", "empty")
    assert matches(index, "???") == set() and matches(index, "") == set()


def test_a_row_matching_two_sets_counts_under_both_and_once_in_the_total():
    long_mt = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."
    long_alpaca = "What are the names of some famous actors that started their careers on Broadway and then film?"
    index = EvalIndex.build({"mt_bench": [long_mt], "alpaca_eval": [long_alpaca]})
    both = pair(long_mt, chosen="Sure. " + long_alpaca)
    mt_only = pair("Please: " + long_mt.upper())
    clean = pair("Compose an engaging blog post.")
    rows = [both, mt_only, clean]
    kept, dropped = decontaminate(rows, preference_texts, index)
    assert kept == [clean]
    assert dropped == collections.Counter({"mt_bench": 2, "alpaca_eval": 1})
    assert len(rows) - len(kept) == 2 and sum(dropped.values()) == 3  # the total is not the Counter's sum
    # the same rows seen through their prompt only: the AlpacaEval copy is in an answer
    assert decontaminate(rows, prompt_texts, index)[1] == collections.Counter({"mt_bench": 2, "alpaca_eval": 0})


def test_clean_rows_pass_untouched():
    index = EvalIndex.build({"stories": [FOX], "colours": ["red green blue yellow"]})
    rows = [pair("How do I bake bread?", "Mix flour, water, yeast; knead; bake."),
            {"id": "d1", "messages": [user("The quick brown fox jumps."), assistant("Over the lazy dog, yes.")]}]
    before = copy.deepcopy(rows)
    kept, dropped = decontaminate(rows[:1], preference_texts, index)
    kept_d, dropped_d = decontaminate(rows[1:], dialogue_texts, index)
    assert kept[0] is rows[0] and kept_d[0] is rows[1] and rows == before
    assert dict(dropped) == dict(dropped_d) == {"stories": 0, "colours": 0}  # every set named, even at 0


def test_bad_arguments_fail_at_once():
    with pytest.raises(ValueError, match="n and min_words"):
        EvalIndex.build({"a": [FOX]}, n=0)
    with pytest.raises(ValueError, match="non-empty str name"):
        EvalIndex.build({"": [FOX]})
    with pytest.raises(TypeError, match="is a str"):
        EvalIndex.build({"a": FOX})
    with pytest.raises(TypeError, match="text 1 is NoneType"):
        EvalIndex.build({"a": [FOX, None]})


def test_read_arc_and_its_texts(tmp_path):
    good = {"id": "Mercury_1", "question": "Which gas do plants take in?",
            "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"}
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert read_arc(SourceConfig(path=str(path))) == [
        {"id": "Mercury_1", "question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"],
         "labels": ["A", "B"], "answer_key": "B"}]
    assert arc_texts(SourceConfig(path=str(path))) == [
        "Which gas do plants take in?", "Which gas do plants take in?\noxygen\ncarbon dioxide"]
    assert arc_texts(SourceConfig(path=str(path)), with_choices=False) == ["Which gas do plants take in?"]
    path.write_text(json.dumps({**good, "answerKey": "C"}) + "\n", encoding="utf-8")
    with pytest.raises(RowError, match="row 1, field answerKey: answerKey 'C' is none of the labels"):
        read_arc(SourceConfig(path=str(path)))


# --- real samples --------------------------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("contamination", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain_sets(sets, n=13, min_words=8):
    """The three rules again, by hand, without the index or its hashes: per set, its n-grams as word
    tuples, its min_words..n-1-word texts as space-joined strings, and its shorter texts as word tuples."""
    plain = {}
    for name, texts in sets.items():
        grams, contained, equal = set(), [], set()
        for text in texts:
            seq = words(text)
            if len(seq) >= n:
                grams.update(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))
            elif len(seq) >= min_words:
                contained.append(f" {' '.join(seq)} ")
            elif seq:
                equal.add(tuple(seq))
        plain[name] = grams, contained, equal
    return plain


def _plain_matches(plain, text, n=13):
    seq = words(text)
    joined = f" {' '.join(seq)} "
    own = {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}
    return {name for name, (grams, contained, equal) in plain.items()
            if own & grams or any(c in joined for c in contained) or tuple(seq) in equal}


@needs_data
@pytest.mark.parametrize("n, min_words", [(13, 8), (8, 8), (13, 4)])  # the defaults, then settings that match
def test_real_samples_measured_as_recomputed(n, min_words):
    script = _script()
    rows, _ = script.training_rows(DATA)
    sets = script.eval_sets(DATA)
    assert {name: len(texts) for name, texts in sets.items()} == {
        "mt_bench": 160, "alpaca_eval": 805, "arc_challenge": 2 * 1172}
    result = script.measure(DATA, n, min_words=min_words, rows=rows, sets=sets)
    plain = _plain_sets(sets, n, min_words)
    expected, dropped = collections.Counter({name: 0 for name in sets}), 0
    for row in rows:
        found = set().union(*(_plain_matches(plain, text, n) for text in preference_texts(row)))
        expected.update(found)
        dropped += bool(found)
    assert result["by_set"] == dict(expected) and result["dropped"] == dropped
    assert result["rows"] == len(rows) == 994  # the sample's 1000 less its 6 bad rows (4 identical pairs, 2 empty)


@needs_data
def test_the_script_prints_what_it_measures(capsys):
    script = _script()
    script.main(["--n", "8", "--examples", "2"])
    result = script.measure(DATA, 8, examples=2)
    out = capsys.readouterr().out
    assert f"n=8: {result['dropped']} of 994 rows match some evaluation set" in out
    for name, count in result["by_set"].items():
        assert f"  {name:14} {count:4} rows ({result['by_set_prompt'][name]} by prompt)" in out
    assert result["examples"]["alpaca_eval"] and all(e in out for e in result["examples"]["alpaca_eval"])


@needs_data
def test_real_mt_bench_copy_in_a_training_row_is_caught():
    script = _script()
    rows, _ = script.training_rows(DATA)
    index = EvalIndex.build(script.eval_sets(DATA))
    kept, _ = decontaminate(rows, preference_texts, index)
    question = json.loads((DATA / "mt_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines()[0])
    # a clean row whose answer quotes the first question, re-cased and re-punctuated
    planted = copy.deepcopy(kept[0])
    planted["chosen"] = [assistant("Here it is -- " + question["turns"][0].upper().replace(",", ";") + " Done.")]
    out, dropped = decontaminate([planted, *kept[1:3]], preference_texts, index)
    assert dropped["mt_bench"] == 1 and out == kept[1:3]
