"""Running a recipe: its stages in order, each in its own folder of the run directory.

A stage whose manifest says complete is skipped; one that was killed resumes (each stage
keeps its own progress: part files, checkpoints). Every manifest records the resolved
config, the code version, seeds, row counts kept and dropped, and the global batch size.
"""

from __future__ import annotations

import json

import numpy as np
from transformers import AutoTokenizer

from dalign.backends import Sampling
from dalign.binarize import binarize
from dalign.completions import Member, run_completions
from dalign.config import RecipeConfig
from dalign.data import read_rows, write_json, write_rows
from dalign.dpo import run_dpo
from dalign.evaluate import evaluate_mt_bench, make_questions
from dalign.generate import run_dialogues
from dalign.generation import LocalModel
from dalign.manifest import Stage
from dalign.parallel import LaunchError, barrier, is_main, launched_processes
from dalign.pretrain import run_pretrain
from dalign.rate import run_rating
from dalign.sft import run_sft
from dalign.winrate import win_rate
from dalign.world.judge import WorldComparer, WorldJudge, WorldRater
from dalign.world.roles import Flaws, WorldTeacher, WorldUser, fresh_openings

# Each fixed stage, the stages it reads from, and the recipe sections that configure it.
# dDPO stages (one per variant, dpo-<name>) and the evaluation are added by `plan`.
FIXED = {
    "base": ((), ("base",)),
    "dialogues": (("base",), ("dialogues", "teacher")),
    "sft": (("base", "dialogues"), ("sft",)),
    "completions": (("base", "dialogues", "sft"), ("completions",)),
    "ratings": (("completions",), ("rating",)),
    "pairs": (("ratings",), ("pairs",)),
}


def plan(recipe: RecipeConfig) -> dict[str, tuple[tuple[str, ...], dict]]:
    """Every stage of the recipe in order: the stages it reads and its own config."""
    stages = {name: (needs, {s: getattr(recipe, s).model_dump(mode="json") for s in sections})
              for name, (needs, sections) in FIXED.items()}
    dpo_names = []
    for v in recipe.variants:
        dpo_names.append(f"dpo-{v.name}")
        stages[dpo_names[-1]] = ((v.start, "pairs"), {"dpo": recipe.dpo.model_dump(mode="json"), "variant": v.model_dump()})
    stages["evaluate"] = (("base", "dialogues", "sft", "completions", *dpo_names),
                          {"evaluate": recipe.evaluate.model_dump(mode="json")})
    return stages


class MissingInputError(RuntimeError):
    """A stage was asked for before the stage it reads from has completed."""


def _flaws(teacher) -> Flaws:
    return Flaws(**teacher.model_dump(exclude={"seed"}))


# The stages that train, and the recipe section holding each one's TrainConfig. Only these run
# under a multi-process launch; the others run in one process.
TRAINING = {"base": "base", "sft": "sft", "dpo": "dpo"}


def check_launch(recipe: RecipeConfig, names: list[str]) -> None:
    """Refuse, before any work, stages this launch cannot run: a global batch its processes cannot
    split, or a stage that does not yet split its rows across processes."""
    processes = launched_processes()
    for name in names:
        if (section := TRAINING.get(name.split("-")[0])) is not None:
            getattr(recipe, section).batch_sizes(processes, section)
        elif processes > 1:
            raise LaunchError(f"stage {name} runs in one process (only {', '.join(TRAINING)} train under a launch of "
                              f"{processes}): run it without torchrun/accelerate launch, then launch the training "
                              "stages one at a time (dalign sft RECIPE, dalign dpo RECIPE)")


def run_stage(recipe: RecipeConfig, name: str, stages: dict | None = None, runners: dict | None = None) -> dict:
    """Run one stage unless its manifest says complete. `stages` (a plan) and `runners` are the
    offline recipe's unless given: a recipe on a real model passes its own (dalign.real). Under a
    multi-process launch every process runs the stage and rank 0 alone writes its manifest."""
    stages, runners = stages or plan(recipe), runners or RUNNERS
    stage = Stage(recipe.run_dir, name, stages[name][1])
    main = is_main()
    if stage.done():
        if main:
            print(f"[{name}] complete in {stage.dir}, skipped")
        return stage.read()
    inputs = {}
    for needed in stages[name][0]:
        upstream = Stage(recipe.run_dir, needed, stages[needed][1])
        if not upstream.done():
            raise MissingInputError(f"stage {needed} has not completed in {recipe.run_dir}; run it first (dalign run)")
        inputs[needed] = upstream.dir
    if main:
        stage.start()
        print(f"[{name}] running in {stage.dir}")
    barrier()
    facts = runners[name.split("-")[0]](recipe, stage.dir, inputs, *name.split("-", 1)[1:])
    if main:
        stage.finish(recipe=recipe.name, inputs={k: str(v) for k, v in inputs.items()}, **facts)
    barrier()
    return stage.read()


def _base(recipe, out, inputs):
    return {"seeds": {"weights_and_data": recipe.base.seed}, **run_pretrain(recipe.base, out)}


def _dialogues(recipe, out, inputs):
    tokenizer = AutoTokenizer.from_pretrained(inputs["base"] / "model")
    teacher = WorldTeacher(_flaws(recipe.teacher), seed=recipe.teacher.seed)
    facts = run_dialogues(recipe.dialogues, tokenizer, WorldUser(seed=recipe.dialogues.seed), teacher, out)
    return {"seeds": {"topics": recipe.dialogues.seed, "teacher": recipe.teacher.seed}, **facts}


def _sft(recipe, out, inputs):
    facts = run_sft(recipe.sft, inputs["base"] / "model", inputs["dialogues"] / "dialogues.jsonl", out,
                    np.load(inputs["base"] / "corpus_tokens.npy"))
    return {"seeds": {"data_order": recipe.sft.seed}, **facts}


def _sft_prompts(inputs) -> set[str]:
    return {r["messages"][0]["content"] for r in read_rows(inputs["dialogues"] / "dialogues.jsonl")}


def _completions(recipe, out, inputs):
    cfg = recipe.completions
    # Small categories (a 24-person atlas) may run out of prompts the dSFT data did not use.
    openings = fresh_openings(-(-cfg.n_prompts // 8), cfg.seed, "aif", _sft_prompts(inputs), strict=False)[:cfg.n_prompts]
    prompts = [{"prompt_id": f"aif-{cfg.seed}-{i}", "category": cat, "prompt": [{"role": "user", "content": text}]}
               for i, (cat, text) in enumerate(openings)]
    members = []
    for m in cfg.members:
        if m.flaws is not None:
            backend = WorldTeacher(_flaws(m.flaws), seed=m.flaws.seed, name=m.name)
        else:
            backend = member_backend(m, {k: v / "model" for k, v in inputs.items()}, out)
        members.append(Member(m.name, backend, Sampling(m.temperature, cfg.max_new_tokens, cfg.seed)))
    facts = run_completions(prompts, members, cfg.per_prompt, cfg.principles, cfg.chunk_size, cfg.seed, out)
    facts.update(backend_facts(m.backend for m in members))
    per_category = {c: sum(p["category"] == c for p in prompts) for c in dict.fromkeys(p["category"] for p in prompts)}
    return {"seeds": {"prompts_and_members": cfg.seed}, "prompts_per_category": per_category, **facts}


def member_backend(member, models: dict, out, chat_template: str | None = None):
    """An ensemble member's backend: a server, or a local model (a stage's by name, else a folder,
    hub id or built-in name)."""
    if member.openai is not None:
        from dalign.openai_backend import OpenAIBackend

        return OpenAIBackend.for_stage(member.openai, out, member.name)
    return LocalModel.load(models.get(member.model, member.model), name=member.name, chat_template=chat_template)


def backend_facts(backends) -> dict:
    """Generation throughput of local models and token usage of servers, for the manifest."""
    facts = {"generation": {}, "usage": {}}
    for b in backends:
        if isinstance(b, LocalModel):
            facts["generation"][b.name] = b.throughput()
        elif hasattr(b, "usage"):
            facts["usage"][b.name] = b.usage()
    return {k: v for k, v in facts.items() if v}


def _ratings(recipe, out, inputs):
    rows = read_rows(inputs["completions"] / "completions.jsonl")
    return {"seeds": {"shown_order": recipe.rating.seed},
            **run_rating(rows, WorldRater(), recipe.rating.retries, recipe.rating.chunk_size, recipe.rating.seed, out)}


def _pairs(recipe, out, inputs):
    cfg = recipe.pairs
    train, test, dropped = binarize(read_rows(inputs["ratings"] / "ratings.jsonl"), cfg.rejection, cfg.seed, cfg.test_fraction)
    write_rows(out / "train.jsonl", train)
    write_rows(out / "test.jsonl", test)
    differ = sum(r["score_chosen"] > r["score_rejected"] for r in train + test)
    return {"seeds": {"picks_and_split": cfg.seed}, "rows": {"kept": len(train) + len(test), "dropped": dict(dropped)},
            "train": len(train), "test": len(test), "share_scores_differ": differ / max(1, len(train) + len(test))}


def _dpo(recipe, out, inputs, variant_name):
    variant = next(v for v in recipe.variants if v.name == variant_name)
    start = inputs[variant.start] / "model"  # the starting point is also the frozen reference
    cfg = recipe.dpo.model_copy(update={"epochs": variant.epochs})
    return {"seeds": {"data_order": cfg.seed}, "start": variant.start,
            **run_dpo(cfg, start, start, inputs["pairs"] / "train.jsonl", out)}


def _evaluate(recipe, out, inputs):
    cfg = recipe.evaluate
    seen = _sft_prompts(inputs) | {r["prompt"][-1]["content"] for r in read_rows(inputs["completions"] / "completions.jsonl")}
    questions = make_questions(cfg.questions_per_category, cfg.seed, exclude=seen)
    instructions = [text for _, text in fresh_openings(cfg.win_rate_instructions // 8, cfg.seed, "winrate", seen)]
    judge, comparer, summary = WorldJudge(), WorldComparer(), {}
    greedy = Sampling(0.0, cfg.max_new_tokens, cfg.seed)
    labels = ["base", "sft"] + [f"dpo-{v.name}" for v in recipe.variants]
    for label in labels:
        # Each model's results are written whole; a rerun skips the finished ones.
        model = None
        if not (out / f"{label}.json").exists():
            model = LocalModel.load(inputs[label] / "model", batch_size=cfg.batch_size)
            result = evaluate_mt_bench(model, judge, questions, cfg)
            result["generation"] = model.throughput()
            write_json(out / f"{label}.json", result, indent=1)
        if not (out / f"answers_{label}.json").exists():
            model = model or LocalModel.load(inputs[label] / "model", batch_size=cfg.batch_size)
            write_json(out / f"answers_{label}.json",
                       model.generate([[{"role": "user", "content": i}] for i in instructions], greedy), indent=1)
        result = json.loads((out / f"{label}.json").read_text())
        summary[label] = {k: result[k] for k in ("score", "ci95", "first_turn_correct", "greedy_accuracy", "pass_at_k",
                                                  "categories", "judge_failures", "questions")}
    reference = json.loads((out / "answers_sft.json").read_text())
    for label in [x for x in labels if x != "sft"]:
        result = win_rate(instructions, json.loads((out / f"answers_{label}.json").read_text()), reference, comparer)
        write_json(out / f"win_rate_{label}_vs_sft.json", result, indent=1)
        summary[label]["win_rate_vs_sft"] = {k: result[k] for k in ("win_rate", "ci95", "length_controlled_win_rate",
                                                                    "wins", "ties", "losses", "judge_failures")}
    return {"seeds": {"questions_and_sampling": cfg.seed}, "judge": judge.name, "comparer": comparer.name,
            "results": summary, "rows": {"questions": len(questions), "win_rate_instructions": len(instructions)}}


RUNNERS = {"base": _base, "dialogues": _dialogues, "sft": _sft, "completions": _completions, "ratings": _ratings,
           "pairs": _pairs, "dpo": _dpo, "evaluate": _evaluate}


def run_recipe(recipe: RecipeConfig, only: str | None = None) -> dict:
    stages = plan(recipe)
    if only == "dpo":  # `dalign dpo` runs every variant
        names = [n for n in stages if n.startswith("dpo-")]
    else:
        names = list(stages) if only is None else [only]
    check_launch(recipe, names)
    return {name: run_stage(recipe, name, stages) for name in names}


def score_table(evaluation: dict) -> str:
    results = evaluation["results"]
    cats = list(next(iter(results.values()))["categories"])
    k = evaluation["config"]["evaluate"]["pass_k"]
    head = ["model", "MT-Bench-style score (95% CI)", "win rate vs dSFT (LC)", "1st-turn correct", "greedy acc",
            f"pass@{k}"] + cats
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        w = r.get("win_rate_vs_sft")
        wins = f"{w['win_rate']:.1%} ± {w['ci95']:.1%} ({w['length_controlled_win_rate'] or float('nan'):.1%})" if w else "-"
        cells = [label, f"{r['score']:.2f} ± {r['ci95']:.2f}", wins, f"{r['first_turn_correct']:.0%}",
                 f"{r['greedy_accuracy']:.0%}", f"{r['pass_at_k']:.0%}"]
        cells += [f"{r['categories'][c]['score']:.1f} ({r['categories'][c]['first_turn_correct']:.0%})" for c in cats]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
