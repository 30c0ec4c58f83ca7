"""The `dalign` command: one subcommand per stage, and `run` for a whole recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dalign.config import ConfigError, load_recipe
from dalign.data import RowError
from dalign.manifest import StageDirError
from dalign.run import MissingInputError, run_recipe, score_table

DEFAULT_RECIPE = None  # the built-in offline world; recipes/offline.yaml spells the same values out


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="YAML recipe (default: the built-in offline world)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.learning_rate=5e-4 run_dir=runs/x")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dalign", description="Align a small language model by distillation "
                                  "(Zephyr recipe: dSFT, AI feedback, dDPO, evaluation).")
    sub = top.add_subparsers(dest="command", required=True)
    _recipe_args(sub.add_parser("run", help="run every stage of a recipe into its run directory"))
    _recipe_args(sub.add_parser("pretrain", help="train the offline world's base model from scratch"))
    gen = sub.add_parser("generate", help="generate data with a teacher").add_subparsers(dest="what", required=True)
    _recipe_args(gen.add_parser("dialogues", help="UltraChat-style dialogues from seed topics (dSFT data)"))
    _recipe_args(gen.add_parser("completions", help="completions of AI-feedback prompts by an ensemble"))
    _recipe_args(sub.add_parser("sft", help="distilled supervised fine-tuning on the dialogues"))
    _recipe_args(sub.add_parser("rate", help="the teacher rates each prompt's completions on four aspects"))
    _recipe_args(sub.add_parser("binarize", help="rated completions into chosen/rejected preference pairs"))
    _recipe_args(sub.add_parser("dpo", help="distilled DPO on the pairs, the dSFT model as reference"))
    ev = sub.add_parser("evaluate", help="evaluate models").add_subparsers(dest="what", required=True)
    _recipe_args(ev.add_parser("mt-bench", help="MT-Bench-style two-turn questions graded 1-10 by the judge "
                                                "(the evaluation stage: also computes the win rates)"))
    _recipe_args(ev.add_parser("win-rate", help="AlpacaEval-style win rate against the dSFT model, both orders judged "
                                                "(the evaluation stage: also computes MT-Bench-style scores)"))
    rep = sub.add_parser("report", help="Markdown and HTML report of one or more run directories")
    rep.add_argument("runs", nargs="+", help="run directories (each with a completed evaluation)")
    rep.add_argument("--out", help="folder for report.md, report.html and the charts (default: RUN/report)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        from dalign.report import write_report  # matplotlib is only needed here

        runs = [Path(r) for r in args.runs]
        try:
            path = write_report(runs, Path(args.out) if args.out else runs[0] / "report")
        except FileNotFoundError as err:
            print(f"dalign: error: {err}", file=sys.stderr)
            return 2
        print(f"report written to {path} and {path.with_suffix('.html')}")
        return 0
    # A recipe path is optional, so a lone key=value lands in `recipe`: put it back with the overrides.
    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path and "=" in recipe_path and not recipe_path.endswith((".yaml", ".yml")):
        recipe_path, overrides = None, [recipe_path] + overrides
    stage = {"run": None, "pretrain": "base", "sft": "sft", "evaluate": "evaluate", "rate": "ratings",
             "binarize": "pairs", "dpo": "dpo"}.get(args.command) or getattr(args, "what", None)
    try:
        recipe = load_recipe(recipe_path, overrides)
        manifests = run_recipe(recipe, only=stage)
    except (ConfigError, RowError, StageDirError, MissingInputError) as err:
        print(f"dalign: error: {err}", file=sys.stderr)
        return 2
    if "evaluate" in manifests:
        print("\n" + score_table(manifests["evaluate"]))
        if args.command == "run":
            from dalign.report import write_report

            path = write_report([Path(recipe.run_dir)], Path(recipe.run_dir) / "report")
            print(f"\nreport: {path} and {path.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
