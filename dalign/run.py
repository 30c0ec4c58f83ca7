"""Running a recipe: its stages in order, each in its own folder of the run directory.

A stage whose manifest says complete is skipped; one that was killed resumes (each stage
keeps its own progress: part files, checkpoints). Every manifest records the resolved
config, the code version, seeds, row counts kept and dropped, and the global batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from dalign.config import RecipeConfig
from dalign.data import read_rows
from dalign.evaluate import evaluate_mt_bench, make_questions
from dalign.generate import run_dialogues
from dalign.generation import LocalModel
from dalign.manifest import Stage
from dalign.pretrain import run_pretrain
from dalign.sft import run_sft
from dalign.world.judge import WorldJudge
from dalign.world.roles import Flaws, WorldTeacher, WorldUser

STAGES = ("base", "dialogues", "sft", "evaluate")


class MissingInputError(RuntimeError):
    """A stage was asked for before the stage it reads from has completed."""


def _stage(recipe: RecipeConfig, name: str) -> Stage:
    configs = {"base": {"base": recipe.base.model_dump()},
               "dialogues": {"dialogues": recipe.dialogues.model_dump(), "teacher": recipe.teacher.model_dump()},
               "sft": {"sft": recipe.sft.model_dump()},
               "evaluate": {"evaluate": recipe.evaluate.model_dump()}}
    return Stage(recipe.run_dir, name, configs[name])


def _need(recipe: RecipeConfig, name: str) -> Path:
    stage = _stage(recipe, name)
    if not stage.done():
        raise MissingInputError(f"stage {name} has not completed in {recipe.run_dir}; run it first (dalign run)")
    return stage.dir


def run_stage(recipe: RecipeConfig, name: str) -> dict:
    stage = _stage(recipe, name)
    if stage.done():
        print(f"[{name}] complete in {stage.dir}, skipped")
        return stage.read()
    inputs = {n: str(_need(recipe, n)) for n in STAGES[:STAGES.index(name)] if n != "evaluate"}
    stage.start()
    print(f"[{name}] running in {stage.dir}")
    common = {"recipe": recipe.name, "inputs": inputs}
    if name == "base":
        facts = run_pretrain(recipe.base, stage.dir)
        return stage.finish(**common, seeds={"weights_and_data": recipe.base.seed}, **facts)
    if name == "dialogues":
        tokenizer = AutoTokenizer.from_pretrained(Path(inputs["base"]) / "model")
        teacher = WorldTeacher(Flaws(**recipe.teacher.model_dump(exclude={"seed"})), seed=recipe.teacher.seed)
        facts = run_dialogues(recipe.dialogues, tokenizer, WorldUser(seed=recipe.dialogues.seed), teacher, stage.dir)
        return stage.finish(**common, seeds={"topics": recipe.dialogues.seed, "teacher": recipe.teacher.seed}, **facts)
    if name == "sft":
        base = Path(inputs["base"])
        facts = run_sft(recipe.sft, base / "model", Path(inputs["dialogues"]) / "dialogues.jsonl", stage.dir,
                        np.load(base / "corpus_tokens.npy"))
        return stage.finish(**common, seeds={"data_order": recipe.sft.seed}, **facts)
    return stage.finish(**common, seeds={"questions_and_sampling": recipe.evaluate.seed}, **_evaluate(recipe, stage, inputs))


def _evaluate(recipe: RecipeConfig, stage: Stage, inputs: dict) -> dict:
    cfg = recipe.evaluate
    seen = {r["messages"][0]["content"] for r in read_rows(Path(inputs["dialogues"]) / "dialogues.jsonl")}
    questions = make_questions(cfg.questions_per_category, cfg.seed, exclude=seen)
    judge, summary = WorldJudge(), {}
    for label in ("base", "sft"):
        out = stage.dir / f"{label}.json"
        if not out.exists():  # each model's results are written whole; a rerun skips finished ones
            model = LocalModel.load(Path(inputs[label]) / "model", batch_size=cfg.batch_size)
            result = evaluate_mt_bench(model, judge, questions, cfg)
            result["generated_tokens"] = model.generated_tokens
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(out)
        result = json.loads(out.read_text())
        summary[label] = {k: result[k] for k in ("score", "ci95", "first_turn_correct", "greedy_accuracy", "pass_at_k",
                                                  "categories", "judge_failures", "questions")}
    return {"judge": judge.name, "results": summary, "rows": {"questions": len(questions)}}


def run_recipe(recipe: RecipeConfig, only: str | None = None) -> dict:
    manifests = {}
    for name in STAGES if only is None else (only,):
        manifests[name] = run_stage(recipe, name)
    return manifests


def score_table(evaluation: dict) -> str:
    results = evaluation["results"]
    cats = list(next(iter(results.values()))["categories"])
    k = evaluation["config"]["evaluate"]["pass_k"]
    head = ["model", "MT-Bench-style score (95% CI)", "1st-turn correct", "greedy acc", f"pass@{k}"] + cats
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        cells = [label, f"{r['score']:.2f} ± {r['ci95']:.2f}", f"{r['first_turn_correct']:.0%}",
                 f"{r['greedy_accuracy']:.0%}", f"{r['pass_at_k']:.0%}"]
        cells += [f"{r['categories'][c]['score']:.1f} ({r['categories'][c]['first_turn_correct']:.0%})" for c in cats]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
