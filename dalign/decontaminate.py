"""N-gram decontamination: drop training rows that share a run of words with an evaluation set.

As GPT-3 (Brown et al., 2020) and open-instruct filtered their training data: a training text is
contaminated by an evaluation set when both contain the same ``n`` consecutive words (13 by default).

Texts are compared as word sequences (see ``words``): NFKC-normalized, case-folded, cut into runs of
Unicode letters and digits, everything else (spaces, punctuation, underscores, symbols) a separator.
A copy of a benchmark question that changed its case, quotes, punctuation or line breaks is still a copy;
the price is that "don't" is the two words "don", "t" and "3.14" is "3", "14", on both sides alike.

An evaluation text of ``k`` words is matched by one of three rules:

* ``k >= n`` (``Rule.NGRAM``): a training text matches when it holds any of the text's n-grams.
* ``min_words <= k < n`` (``Rule.CONTAINED``): the text is too short to have an n-gram, so it is taken
  whole, as one k-gram: a training text matches when it holds all k words contiguously, in order.
  MT-Bench's "Rewrite your previous response. Start every sentence with the letter A." (12 words) is such.
* ``k < min_words`` (``Rule.EQUAL``): a training text matches only when it is the same word sequence.
  "Who is Larry Page?" (AlpacaEval, 4 words) occurs inside many innocent texts, so containment would
  drop rows that merely mention it, while a training prompt equal to it is a copy. The default of 8 is
  GPT-3's floor on overlap length for natural-language tasks, set to avoid such spurious collisions.

Texts with no word at all (``Rule.NO_WORDS``, e.g. "???") cannot match and are counted, not hidden.
Each training text (one message) is checked on its own, so no n-gram spans two messages.

The index keeps Python ``hash`` values of word tuples, not the words: an eval n-gram costs about 90
bytes (5 MB for the 55k of MT-Bench, AlpacaEval and ARC-Challenge's test set). ``hash`` of a str tuple is salted per process (PYTHONHASHSEED), so an index is only valid in the
process that built it and must not be saved. A 64-bit collision between one of ~10^5 eval n-grams and
one of ~10^6 training n-grams has a chance of about 10^-8, an acceptable risk of one wrongly dropped row.

Typical use (the preference rows of ``dalign.readers.read_preferences``)::

    index = EvalIndex.build({"mt_bench": mt_bench_texts(mt), "alpaca_eval": alpaca_eval_texts(alpaca),
                             "arc_challenge": arc_texts(arc)})
    kept, dropped = decontaminate(rows, preference_texts, index)
    # dropped["mt_bench"]: rows matching MT-Bench; len(rows) - len(kept): rows dropped in all
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from enum import Enum
from typing import Callable, Iterable, Mapping, Sequence

from dalign.data import ReadReport, RowError
from dalign.readers import SourceConfig, _need, _read, _row_id, _strings, _text, read_alpaca_eval, read_mt_bench

DEFAULT_N = 13
"""GPT-3's and open-instruct's n-gram length."""
DEFAULT_MIN_WORDS = 8
"""Shortest evaluation text matched by containment; shorter ones must be equal (see the module doc)."""

_WORD = re.compile(r"[^\W_]+")  # a run of Unicode letters or digits: \w without the underscore


def words(text: str) -> list[str]:
    """The words ``text`` is compared by: NFKC-normalized (full-width and ligature forms become plain
    ones), case-folded (a stronger lower-casing: "Straße" and "STRASSE" agree), then every maximal run of
    letters and digits. Scripts written without spaces (Chinese, Japanese) become one word per run."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


class Rule(str, Enum):
    """How an evaluation text is matched, by its number of words (see the module doc)."""

    NGRAM = "ngram"
    CONTAINED = "contained"
    EQUAL = "equal"
    NO_WORDS = "no_words"

    @classmethod
    def of(cls, k: int, n: int, min_words: int) -> "Rule":
        if k == 0:
            return cls.NO_WORDS
        if k >= n:
            return cls.NGRAM
        return cls.CONTAINED if k >= min_words else cls.EQUAL


def _grams(seq: list[str], k: int) -> Iterable[tuple[str, ...]]:
    """Every run of k consecutive words of seq (none when seq is shorter)."""
    return zip(*(seq[i:] for i in range(k)))


@dataclasses.dataclass(frozen=True)
class EvalIndex:
    """The n-grams (as hashes) of named evaluation sets; build it with ``EvalIndex.build``."""

    n: int
    """Words per n-gram."""
    min_words: int
    """Evaluation texts with fewer words match only an equal training text."""
    by_length: dict[int, dict[str, frozenset[int]]]
    """Window length -> set name -> hashes of word tuples of that length: the n-grams of texts of
    n words or more under n, each whole text of min_words..n-1 words under its own length."""
    equal: dict[str, frozenset[int]]
    """Set name -> hashes of the whole word tuples of its texts under min_words words."""
    rules: dict[str, collections.Counter]
    """Set name -> number of its texts matched by each Rule, for reports (every set is a key)."""

    @classmethod
    def build(cls, sets: Mapping[str, Iterable[str]], *, n: int = DEFAULT_N,
              min_words: int = DEFAULT_MIN_WORDS) -> "EvalIndex":
        """Index ``sets`` (set name -> its texts, e.g. {"mt_bench": [every turn]})."""
        if n < 1 or min_words < 1:
            raise ValueError(f"n and min_words must be at least 1, got n={n}, min_words={min_words}")
        by_length: dict[int, dict[str, set[int]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        equal: dict[str, set[int]] = collections.defaultdict(set)
        rules: dict[str, collections.Counter] = {}
        for name, texts in sets.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"an evaluation set needs a non-empty str name, got {name!r}")
            if isinstance(texts, str):  # a lone str would be indexed letter by letter
                raise TypeError(f"evaluation set {name!r} is a str; give a list of texts")
            rules[name] = collections.Counter({rule: 0 for rule in Rule})
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"evaluation set {name!r}, text {i} is {type(text).__name__}, expected str")
                seq = words(text)
                rule = Rule.of(len(seq), n, min_words)
                rules[name][rule] += 1
                if rule is Rule.NGRAM:
                    by_length[n][name].update(map(hash, _grams(seq, n)))
                elif rule is Rule.CONTAINED:
                    by_length[len(seq)][name].add(hash(tuple(seq)))
                elif rule is Rule.EQUAL:
                    equal[name].add(hash(tuple(seq)))
        return cls(n=n, min_words=min_words,
                   by_length={k: {name: frozenset(h) for name, h in tables.items()}
                              for k, tables in sorted(by_length.items())},
                   equal={name: frozenset(h) for name, h in equal.items()}, rules=rules)

    @property
    def names(self) -> tuple[str, ...]:
        """The evaluation sets' names, in the order given to ``build``."""
        return tuple(self.rules)


def matches(index: EvalIndex, text: str) -> set[str]:
    """Names of the evaluation sets that ``text`` is contaminated by (empty when clean)."""
    seq = words(text)
    whole = hash(tuple(seq))
    found = {name for name, hashes in index.equal.items() if whole in hashes}
    for k, tables in index.by_length.items():
        if len(seq) < k:
            continue
        grams = set(map(hash, _grams(seq, k)))
        found.update(name for name, hashes in tables.items() if not hashes.isdisjoint(grams))
    return found


def overlaps(index: EvalIndex, text: str) -> dict[str, list[str]]:
    """Set name -> the word runs of ``text`` that match it (words joined by one space, first
    occurrence order, no repeats). Its keys are ``matches(index, text)``; slower, for reports."""
    seq = words(text)
    found: dict[str, list[str]] = collections.defaultdict(list)
    whole = hash(tuple(seq))
    for name, hashes in index.equal.items():
        if whole in hashes:
            found[name].append(" ".join(seq))
    for k, tables in index.by_length.items():
        for gram in dict.fromkeys(_grams(seq, k)):
            h = hash(gram)
            for name, hashes in tables.items():
                if h in hashes:
                    found[name].append(" ".join(gram))
    return dict(found)


def decontaminate(rows: Sequence[dict], texts_of: Callable[[dict], Iterable[str]],
                  index: EvalIndex) -> tuple[list[dict], collections.Counter]:
    """Drop every row any of whose texts (``texts_of(row)``) matches an evaluation set.

    Returns ``(kept, dropped)``: ``kept`` holds the other rows, the same objects in the same order;
    ``dropped[name]`` is the number of rows that matched set ``name``, with every set of the index a key
    (0 when clean). A row matching several sets counts once under each, so ``sum(dropped.values())`` can
    exceed the number of rows dropped, which is ``len(rows) - len(kept)``.
    """
    kept: list[dict] = []
    dropped = collections.Counter({name: 0 for name in index.names})
    everything = set(index.names)
    for row in rows:
        found: set[str] = set()
        for text in texts_of(row):
            found |= matches(index, text)
            if found == everything:  # it cannot match more: skip the rest of a long row
                break
        if found:
            dropped.update(found)
        else:
            kept.append(row)
    return kept, dropped


# --- the texts of training rows (dalign.data's schemas) -------------------------------------------

def dialogue_texts(row: dict) -> list[str]:
    """Every message's content of a dialogue row {id, messages}."""
    return [m["content"] for m in row["messages"]]


def preference_texts(row: dict) -> list[str]:
    """The prompt's messages and both answers of a preference row {prompt, chosen, rejected}."""
    return [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]


def unpaired_texts(row: dict) -> list[str]:
    """The prompt's messages and the completion of an unpaired row {prompt, completion, label}."""
    return [m["content"] for key in ("prompt", "completion") for m in row[key]]


def prompt_texts(row: dict) -> list[str]:
    """The messages of a prompt row {prompt_id, prompt}, or the prompt alone of a preference row."""
    return [m["content"] for m in row["prompt"]]


# --- the texts of evaluation sets -----------------------------------------------------------------

def mt_bench_texts(source: SourceConfig) -> list[str]:
    """Every turn of every MT-Bench question. Reference answers are left out: they are what a model
    should answer, and short ones ("4", "x = 2") would be noise."""
    return [turn for question in read_mt_bench(source) for turn in question["turns"]]


def alpaca_eval_texts(source: SourceConfig) -> list[str]:
    """The AlpacaEval instructions (the outputs are one model's answers, not the benchmark)."""
    return [row["instruction"] for row in read_alpaca_eval(source)]


def _arc_question(row: dict) -> dict:
    question = _text(row, "question")
    choices = _need(row, "choices")
    if not isinstance(choices, dict):
        raise RowError(f"choices is {type(choices).__name__}, expected {{text: [...], label: [...]}}",
                       reason="wrong_type", field="choices")
    texts = _strings({"choices.text": choices.get("text")}, "choices.text", allow_empty=False)
    labels = _strings({"choices.label": choices.get("label")}, "choices.label", allow_empty=False)
    if len(labels) != len(texts):
        raise RowError(f"{len(texts)} choices but {len(labels)} labels", reason="wrong_type", field="choices.label")
    answer = _text(row, "answerKey")
    if answer not in labels:
        raise RowError(f"answerKey {answer!r} is none of the labels {labels}", reason="unknown_answer",
                       field="answerKey")
    return {"id": _row_id(row, "id", question), "question": question, "choices": texts, "labels": labels,
            "answer_key": answer}


def read_arc(source: SourceConfig, *, skip_bad: bool = False, report: ReadReport | None = None) -> list[dict]:
    """ARC questions in the ai2_arc format (id, question, choices.text/label, answerKey) as rows
    {id, question, choices (texts), labels, answer_key}; bad rows as in ``dalign.readers``."""
    return _read(source, _arc_question, ("id", "question", "choices", "answerKey"), skip_bad=skip_bad,
                 report=report)


def arc_texts(source: SourceConfig, *, with_choices: bool = True) -> list[str]:
    """Each ARC question, and with ``with_choices`` also the question followed by its choices (one per
    line) as a second text, so a training row that copies the options list matches across the question's
    end; the question alone still gets the short-text rules. Lone choices are too generic to index."""
    texts = []
    for row in read_arc(source):
        texts.append(row["question"])
        if with_choices:
            texts.append("\n".join([row["question"], *row["choices"]]))
    return texts


# --- in the pipeline: the sft and dpo stages' training rows ----------------------------------------

def recipe_sets(recipe) -> dict[str, SourceConfig]:
    """The recipe's evaluation sets read from files, by name: what its training rows are checked against."""
    cfg, sets = recipe.evaluate, {}
    if cfg.mt_bench is not None:
        sets["mt_bench"] = cfg.mt_bench
    if cfg.alpaca_eval is not None:
        sets["alpaca_eval"] = cfg.alpaca_eval
    arc = ((cfg.mc or {}).get("data") or {}).get("arc_challenge", {}).get("test")
    if arc is not None:
        sets["arc_challenge"] = SourceConfig(path=str(arc))
    return sets


def plan_config(recipe) -> dict | None:
    """What a training stage's hash covers of decontamination: None when nothing is checked, so a
    recipe without evaluation files keeps the stage hashes it had."""
    sets = recipe_sets(recipe)
    if not recipe.decontaminate.enabled or not sets:
        return None
    return {**recipe.decontaminate.model_dump(mode="json"), "sets": {k: v.label for k, v in sets.items()}}


TEXTS = {"arc_challenge": arc_texts, "mt_bench": mt_bench_texts, "alpaca_eval": alpaca_eval_texts}


def decontaminated_file(recipe, path, texts_of: Callable[[dict], Iterable[str]], out) -> tuple:
    """The training rows of `path` without those matching an evaluation set of the recipe, written to
    `out/decontaminated.jsonl` by rank 0 (every process then reads it), and the facts for the manifest:
    rows checked and dropped, by evaluation set. `path` itself when nothing is checked."""
    from pathlib import Path

    from dalign.data import read_rows, write_rows
    from dalign.parallel import barrier, is_main

    config = plan_config(recipe)
    if config is None:
        return path, {"checked": False, "reason": "no evaluation set read from a file" if recipe.decontaminate.enabled
                      else "decontaminate.enabled is false"}
    clean = Path(out) / "decontaminated.jsonl"
    rows = read_rows(path)
    index = EvalIndex.build({name: TEXTS[name](source) for name, source in recipe_sets(recipe).items()},
                            n=config["n"], min_words=config["min_words"])
    kept, dropped = decontaminate(rows, texts_of, index)
    if is_main():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_rows(clean, kept)
    barrier()
    return clean, {"checked": True, **config, "rows": len(rows), "dropped": len(rows) - len(kept),
                   "by_set": dict(dropped)}
