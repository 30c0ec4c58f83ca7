"""Binarization: from rated completions to (chosen, rejected) pairs, as UltraFeedback was binarized.

`chosen` is the completion with the highest mean aspect score. `rejected` follows a rule:
the paper's `random` (any other completion, ties included, for diversity), `random_lower`
(only strictly lower-rated ones; prompts where all tie are dropped), `worst`, or `all` (every
strictly lower-rated completion, each its own pair with the same chosen: UltraFeedback's four
completions give up to three pairs instead of one). Each prompt's choice is seeded by its id, so
the result does not depend on order or on resumes; a prompt's pairs all go to its split.
KTO's unpaired rows (prompt, completion, label) come from the pairs (`unpair`) or from every
rated completion (`unpaired_of_row`), with the same split of prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from enum import Enum


class Rejection(str, Enum):
    RANDOM = "random"
    RANDOM_LOWER = "random_lower"
    WORST = "worst"
    ALL = "all"

    @property
    def allows_ties(self) -> bool:
        return self is Rejection.RANDOM


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big"))


def _rated(row: dict) -> list[dict]:
    # An empty answer is never a side of a pair (the rating stage leaves it unrated; a ratings file
    # from elsewhere may not), so every pair is valid input for dDPO.
    return [c for c in row["completions"] if c.get("score") is not None and (c.get("text") or "").strip()]


def _chosen(row: dict, rated: list[dict], seed: int) -> tuple[dict, random.Random]:
    """The best-rated completion (a seeded pick among ties) and the prompt's generator, drawn on."""
    rng = _rng(seed, str(row["prompt_id"]))
    best = max(c["score"] for c in rated)
    return rng.choice([c for c in rated if c["score"] == best]), rng


def binarize_row(row: dict, rule: Rejection, seed: int) -> tuple[dict | None, str | None]:
    """One preference row from one rated prompt, or (None, reason it was dropped)."""
    if rule is Rejection.ALL:
        raise ValueError("rejection all makes several pairs of a prompt: use pairs_of_row")
    rated = _rated(row)
    if len(rated) < 2:
        return None, "fewer_than_two_rated"
    chosen, rng = _chosen(row, rated, seed)
    others = [c for c in rated if c is not chosen]
    if rule is Rejection.RANDOM:
        rejected = rng.choice(others)
    else:
        lower = [c for c in others if c["score"] < chosen["score"]]
        if not lower:
            return None, "all_tied"
        worst = min(c["score"] for c in lower)
        rejected = rng.choice(lower if rule is Rejection.RANDOM_LOWER else [c for c in lower if c["score"] == worst])
    return _pair(row, chosen, rejected), None


def pairs_of_row(row: dict, rule: Rejection, seed: int) -> tuple[list[dict], str | None]:
    """A rated prompt's preference rows (one, or with `all` one per strictly lower-rated completion,
    in the completions' order), or ([], the reason it gave none)."""
    if rule is not Rejection.ALL:
        pair, reason = binarize_row(row, rule, seed)
        return ([pair] if pair else []), reason
    rated = _rated(row)
    if len(rated) < 2:
        return [], "fewer_than_two_rated"
    chosen, _ = _chosen(row, rated, seed)
    lower = [c for c in rated if c["score"] < chosen["score"]]
    return [_pair(row, chosen, c) for c in lower], (None if lower else "all_tied")


def _pair(row: dict, chosen: dict, rejected: dict) -> dict:
    return {"prompt_id": row["prompt_id"], "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": chosen["text"]}],
            "rejected": [{"role": "assistant", "content": rejected["text"]}],
            "score_chosen": chosen["score"], "score_rejected": rejected["score"],
            "chosen_model": chosen.get("model"), "rejected_model": rejected.get("model")}


def unpaired_of_row(row: dict, desirable_score: float) -> list[dict]:
    """Every rated completion of a prompt as an unpaired (KTO) row: desirable when its score is at
    least `desirable_score`. A prompt with one rated completion still gives its row."""
    return [{"prompt_id": row["prompt_id"], "prompt": row["prompt"],
             "completion": [{"role": "assistant", "content": c["text"]}], "label": c["score"] >= desirable_score,
             "score": c["score"], "model": c.get("model")} for c in _rated(row)]


def unpaired_training_rows(rated: list[dict], desirable_score: float, cfg) -> list[dict]:
    """The unpaired rows of the prompts the pairs train on (`cfg`: the pairs section, whose split
    of prompts they keep: a held-out prompt stays held out)."""
    return [unpaired for row in rated if split_of(str(row["prompt_id"]), cfg.test_fraction, cfg.dev_fraction,
                                                  cfg.seed) == "train" for unpaired in unpaired_of_row(row, desirable_score)]


def unpair(pairs: list[dict]) -> list[dict]:
    """Preference rows as unpaired rows, as TRL's unpair_preference_dataset: each pair's chosen answer
    desirable, its rejected one undesirable. A chosen answer shared by a prompt's pairs (rejection
    all) gives one row."""
    rows, seen = [], set()
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            key = (str(pair.get("prompt_id")), json.dumps(pair["prompt"]), json.dumps(pair[side]), label)
            if key not in seen:
                seen.add(key)
                rows.append({"prompt_id": pair.get("prompt_id"), "prompt": pair["prompt"], "completion": pair[side],
                             "label": label, "score": pair.get(f"score_{side}"), "model": pair.get(f"{side}_model")})
    return rows


def split_of(prompt_id: str, test_fraction: float, dev_fraction: float, seed: int) -> str:
    """Seeded hold-out by prompt id: stable whatever the order or number of rows. One draw decides
    both hold-outs, so adding a dev split takes its prompts from training, never from test."""
    u = _rng(seed, f"split:{prompt_id}").random()
    return "test" if u < test_fraction else "dev" if u < test_fraction + dev_fraction else "train"


def binarize(rows: list[dict], rule: Rejection, seed: int, test_fraction: float,
             dev_fraction: float = 0.0) -> tuple[dict[str, list[dict]], Counter]:
    """The pairs by split (train, test, dev) and the rows dropped, by reason."""
    splits, dropped = {"train": [], "test": [], "dev": []}, Counter()
    for row in rows:
        pairs, reason = pairs_of_row(row, rule, seed)
        if not pairs:
            dropped[reason] += 1
        else:
            splits[split_of(str(row["prompt_id"]), test_fraction, dev_fraction, seed)].extend(pairs)
    return splits, dropped


def stage(recipe, out, inputs: dict) -> dict:
    """The `pairs` stage: the ratings binarized into train and test splits (pairs.held_out, when
    set, replaces the test split), or pairs read from pairs.source and pairs.held_out."""
    from dalign.data import read_rows, write_rows
    from dalign.parallel import is_main
    from dalign.readers import read_preferences, read_source, read_unpaired

    cfg = recipe.pairs
    if not is_main():  # one quick pass, made once: the other processes wait at the stage's barrier
        return {}
    if cfg.source is not None:  # the held-out rows are pairs either way: the reward accuracy compares two answers
        train_reader = read_unpaired if cfg.source_rows == "unpaired" else read_preferences
        read = {split: read_source(source, reader, out / f"{split}.jsonl")
                for split, source, reader in (("train", cfg.source, train_reader), ("test", cfg.held_out, read_preferences))}
        return {"rows": {"kept": read["train"]["kept"] + read["test"]["kept"],
                         "dropped": {f"{s}:{k}": v for s in read for k, v in read[s]["dropped"].items()}}, **read}
    splits, dropped = binarize(read_rows(inputs["ratings"] / "ratings.jsonl"), cfg.rejection, cfg.seed,
                               cfg.test_fraction, cfg.dev_fraction)
    for split, rows in splits.items():
        write_rows(out / f"{split}.jsonl", rows)
    every = [r for rows in splits.values() for r in rows]
    differ = sum(r["score_chosen"] > r["score_rejected"] for r in every)
    facts = {"seeds": {"picks_and_split": cfg.seed}, "rows": {"kept": len(every), "dropped": dict(dropped)},
             "prompts_with_pairs": len({r["prompt_id"] for r in every}),
             **{split: len(rows) for split, rows in splits.items()}, "share_scores_differ": differ / max(1, len(every))}
    if cfg.held_out is not None:
        facts["test"] = read_source(cfg.held_out, read_preferences, out / "test.jsonl")
    return facts
