"""How many rows of the UltraFeedback sample overlap MT-Bench, AlpacaEval and ARC-Challenge.

    .venv/bin/python scripts/contamination.py [--data DIR] [--n 13 8] [--min-words 8] [--examples 3]

For each n it prints, per evaluation set, the training rows that match it through any of their texts
(prompt, chosen, rejected) and through their prompt alone, the rows dropped in all, and a few of the
matched word runs with the row and the field they were found in.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from dalign.data import ReadReport
from dalign.decontaminate import (DEFAULT_MIN_WORDS, EvalIndex, alpaca_eval_texts, arc_texts, decontaminate,
                                  mt_bench_texts, overlaps, preference_texts, prompt_texts)
from dalign.readers import SourceConfig, read_preferences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # /work/shared/data beside /work/main
TRAIN = "ultrafeedback/ultrafeedback_binarized_subset_train_1000.jsonl"


def eval_sets(data: Path) -> dict[str, list[str]]:
    return {"mt_bench": mt_bench_texts(SourceConfig(path=str(data / "mt_bench" / "question.jsonl"))),
            "alpaca_eval": alpaca_eval_texts(SourceConfig(path=str(data / "alpaca_eval" / "instructions_805.json"))),
            "arc_challenge": arc_texts(SourceConfig(path=str(data / "arc" / "arc_challenge_test.jsonl")))}


def training_rows(data: Path) -> tuple[list[dict], ReadReport]:
    report = ReadReport(str(data / TRAIN))
    rows = read_preferences(SourceConfig(path=str(data / TRAIN)), skip_bad=True, report=report)
    return rows, report


def _examples(rows: list[dict], index: EvalIndex, per_set: int) -> dict[str, list[str]]:
    """Up to per_set matched runs per set, each from a different row, with where they were found."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            for message in row[key]:
                for name, runs in overlaps(index, message["content"]).items():
                    if len(found[name]) < per_set:
                        found[name].append(f"{row['prompt_id'][:10]} {key}: {runs[0]!r}")
        if all(len(found[name]) >= per_set for name in index.names):
            break
    return dict(found)


def measure(data: Path, n: int, *, min_words: int = DEFAULT_MIN_WORDS, examples: int = 3,
            rows: list[dict] | None = None, sets: dict[str, list[str]] | None = None) -> dict:
    """The contamination of the training sample at n-gram length n, as a dict (printed by main);
    rows and sets, when given, save reading the files again."""
    rows = training_rows(data)[0] if rows is None else rows
    index = EvalIndex.build(eval_sets(data) if sets is None else sets, n=n, min_words=min_words)
    kept, by_set = decontaminate(rows, preference_texts, index)
    prompt_kept, by_set_prompt = decontaminate(rows, prompt_texts, index)
    kept_ids = {id(row) for row in kept}
    dropped = [row for row in rows if id(row) not in kept_ids] if examples else []
    return {"n": n, "rows": len(rows), "dropped": len(rows) - len(kept), "by_set": dict(by_set),
            "dropped_by_prompt": len(rows) - len(prompt_kept), "by_set_prompt": dict(by_set_prompt),
            "eval_texts": {name: {rule.value: c for rule, c in rules.items()} for name, rules in index.rules.items()},
            "examples": _examples(dropped, index, examples)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help=f"folder of the real samples (default {DATA})")
    p.add_argument("--n", type=int, nargs="+", default=[13, 8], help="n-gram lengths (default 13 8)")
    p.add_argument("--min-words", type=int, default=DEFAULT_MIN_WORDS,
                   help="eval texts with fewer words must equal a training text (default %(default)s)")
    p.add_argument("--examples", type=int, default=3, help="matched runs shown per evaluation set")
    args = p.parse_args(argv)
    rows, report = training_rows(args.data)
    sets = eval_sets(args.data)
    print(f"training: {report.kept} rows of {TRAIN}" + (f", {dict(report.dropped)} bad rows dropped"
                                                         if report.dropped else ""))
    for n in args.n:
        result = measure(args.data, n, min_words=args.min_words, examples=args.examples, rows=rows, sets=sets)
        print(f"\nn={n}: {result['dropped']} of {result['rows']} rows match some evaluation set "
              f"({result['dropped_by_prompt']} through their prompt)")
        for name, count in result["by_set"].items():
            rules = ", ".join(f"{c} {rule}" for rule, c in result["eval_texts"][name].items() if c)
            print(f"  {name:14} {count:4} rows ({result['by_set_prompt'][name]} by prompt)   eval texts: {rules}")
            for example in result["examples"].get(name, []):
                print(f"      {example}")


if __name__ == "__main__":
    main()
