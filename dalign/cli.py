"""The `dalign` command: one subcommand per stage, and `run` for a whole recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dalign import terminal_chat
from dalign.config import ConfigError
from dalign.console import quiet_libraries
from dalign.data import RowError
from dalign.lock import RunLockError
from dalign.manifest import StageDirError
from dalign.models import ModelError
from dalign.parallel import Engine, LaunchError, is_main, launched_engine, launched_processes
from dalign.recipe import load_recipe
from dalign.run import MissingInputError, evaluation_stage, run_recipe, score_table
from dalign.serving import ServeError
from dalign.train import NonFiniteError

DEFAULT_RECIPE = None  # the built-in offline world; recipes/offline.yaml spells the same values out


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="YAML recipe (default: the built-in offline world)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.learning_rate=5e-4 run_dir=runs/x")


def _mc_args(p: argparse.ArgumentParser) -> None:
    # Unset options stay None, so MCConfig's defaults apply (they are written once, there).
    p.add_argument("model", help="model folder, hub id or built-in name (smollm2-135m-instruct)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="arc_challenge hellaswag mmlu truthfulqa_mc2 (default: all)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=DIR|TASK.SPLIT=FILE",
                   help="local data instead of the hub: a folder holding TASK_SPLIT.jsonl files, or one split's file")
    p.add_argument("--num-fewshot", action="append", default=[], metavar="N|TASK=N",
                   help="shots for every task that takes them, or for one (default: the Leaderboard's 25, 10, 5, 0)")
    p.add_argument("--limit", type=int, help="score only the first N questions of each task (each MMLU subject)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="folder that receives mc.json")


def _evaluate_mc(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from dalign.mc import MCConfig, MCError, MCTask, files_in, mc_table, run_mc

    def task_named(name: str) -> MCTask:
        if name not in {t.value for t in MCTask}:
            raise MCError(f"unknown task {name!r}: choose among {', '.join(t.value for t in MCTask)}")
        return MCTask(name)

    fields = {k: getattr(args, k) for k in ("model", "tasks", "limit", "batch_size", "dtype", "device", "seed")
              if getattr(args, k) is not None}
    try:
        data: dict[MCTask, dict] = {}
        for item in args.data:
            key, sep, path = item.partition("=")
            name, _, split = key.partition(".")
            if not sep or not name or not path:
                raise MCError(f"--data {item!r} is not TASK=DIR or TASK.SPLIT=FILE")
            task = task_named(name)
            data.setdefault(task, {}).update({split: path} if split else files_in(path, task))
        shots: dict[MCTask, str] = {}
        for item in args.num_fewshot:
            name, sep, n = item.rpartition("=")
            # A bare N, like lm_eval's --num_fewshot, leaves TruthfulQA (which takes no shots) at 0.
            tasks = [task_named(name)] if sep else [task_named(t) for t in fields.get("tasks") or [t.value for t in MCTask]]
            shots.update({t: n for t in tasks if sep or t.facts.fewshot_split})
        cfg = MCConfig(**fields, data=data, **({"num_fewshot": shots} if shots else {}))
        report = run_mc(cfg, Path(args.out))
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in err.errors()]
        print("dalign: error: invalid options\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    except (MCError, ModelError) as err:
        print(f"dalign: error: {err}", file=sys.stderr)
        return 2
    print("\n" + mc_table(report) + f"\n\nwritten to {Path(args.out) / 'mc.json'}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dalign", description="Align a small language model by distillation "
                                  "(Zephyr recipe: dSFT, AI feedback, dDPO, evaluation).")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage of a recipe into its run directory")
    _recipe_args(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan (parameters, "
                     "global batch sizes, steps, memory per GPU) without loading weights")
    run.add_argument("--processes", type=int, help="with --dry-run: training processes over all nodes (one per GPU; "
                     "default: the launch's, else 1)")
    run.add_argument("--engine", choices=[e.value for e in Engine], help="with --dry-run: ddp, fsdp2, zero2 or zero3 "
                     "(default: the launch's accelerate config, else ddp)")
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
    _recipe_args(ev.add_parser("win-rate", help="AlpacaEval-style win rate against the reference, both orders judged "
                                                "(the evaluation stage: also computes MT-Bench-style scores)"))
    _mc_args(ev.add_parser("mc", help="multiple-choice benchmarks of the Open LLM Leaderboard (ARC-Challenge, "
                                      "HellaSwag, MMLU, TruthfulQA mc2) scored by lm-evaluation-harness"))
    status = sub.add_parser("status", help="each stage of a run directory: complete, running, interrupted or not "
                                           "started, with its rows and time")
    status.add_argument("run_dir", help="a run directory (run_dir of a recipe)")
    rep = sub.add_parser("report", help="Markdown and HTML report of one or more run directories")
    rep.add_argument("runs", nargs="+", help="run directories (each with a completed evaluation)")
    rep.add_argument("--out", help="folder for report.md, report.html and the charts (default: RUN/report)")
    terminal_chat.add_arguments(sub.add_parser("chat", help="chat in the terminal with a model folder, hub id or "
                                                            "built-in model, its replies streamed"))
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "what", None) == "mc":
        return _evaluate_mc(args)
    if args.command == "chat":
        return terminal_chat.chat(args)
    if args.command == "status":
        from dalign.status import status_table

        try:
            print(status_table(args.run_dir))
        except FileNotFoundError as err:
            print(f"dalign: error: {err}", file=sys.stderr)
            return 2
        return 0
    quiet_libraries()
    if args.command == "report":
        from dalign.report import write_report  # matplotlib is only needed here

        from dalign.paper import write_paper_report

        runs = [Path(r) for r in args.runs]
        try:
            if len(runs) == 1 and any(runs[0].glob("seed-*")):  # a recipe's seeds: the paper's tables over them
                path = write_paper_report(runs[0], Path(args.out) if args.out else None)
            else:
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
        if getattr(args, "dry_run", False):
            from dalign.dryrun import dry_run

            print(dry_run(recipe, args.processes or launched_processes(), Engine(args.engine or launched_engine())))
            return 0
        manifests = run_recipe(recipe, only=stage)
    except (ConfigError, RowError, StageDirError, MissingInputError, ModelError, LaunchError, ServeError,
            RunLockError, NonFiniteError) as err:
        print(f"dalign: error: {err}", file=sys.stderr)
        return 2
    evaluation = manifests.get(evaluation_stage(recipe))
    if evaluation is not None and is_main():
        print(("\n" + f"{evaluation_stage(recipe)} (last seed's run, seed {recipe.seeds[-1]})" if recipe.seeds else "")
              + "\n" + score_table(evaluation))
        if args.command == "run" and recipe.evaluate.split == "test":  # a dev evaluation is for choosing, not reporting
            from dalign.paper import write_paper_report
            from dalign.report import write_report

            run = Path(recipe.run_dir)
            path = write_paper_report(run) if recipe.seeds else write_report([run], run / "report")
            print(f"\nreport: {path} and {path.with_suffix('.html')}")
            scored = {label: r["score"] for label, r in evaluation["results"].items() if r.get("score") is not None}
            if scored:  # the next thing a user wants: to talk to the best of them
                best = max(scored, key=scored.get)
                folder = Path(recipe.for_seed(recipe.seeds[-1]).run_dir if recipe.seeds else run) / best / "model"
                if folder.exists():  # a start model's label has no folder of the run's
                    print(f"talk to {best}, the best-scored model: dalign chat {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
