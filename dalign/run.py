"""Running a recipe: one plan of stages for every recipe, each stage in its own folder of the run directory.

The stages are the same whoever provides the roles and the data (dalign.roles): `base` (only
when the recipe starts from the world), `dialogues`, `sft`, `completions`, `ratings`, `pairs`
(or `pairs` alone when they are read), one `dpo-<variant>` per variant, and `evaluate`.
A stage whose manifest says complete is skipped; one that was killed resumes (each stage
keeps its own progress: part files, checkpoints). Every manifest records the config the stage
reads (its hash covers exactly that: changing the judge does not redo training), the code
version, seeds, row counts kept and dropped, and the global batch size.
"""

from __future__ import annotations

import contextlib

from dalign import binarize, completions, decontaminate, dpo, evaluate, generate, pretrain, rate, serving, sft, tracking
from dalign.adapters import check as check_lora
from dalign.cards import write_cards
from dalign.config import ConfigError
from dalign.console import stage_summary
from dalign.lock import RunLock
from dalign.losses import PreferenceLoss
from dalign.manifest import Stage
from dalign.parallel import barrier, is_main, launched_processes
from dalign.recipe import RecipeConfig
from dalign.status import write_plan

RUNNERS = {"base": pretrain.stage, "dialogues": generate.stage, "sft": sft.stage, "completions": completions.stage,
           "ratings": rate.stage, "pairs": binarize.stage, "dpo": dpo.stage, "evaluate": evaluate.stage}


def plan(recipe: RecipeConfig) -> dict[str, tuple[tuple[str, ...], dict]]:
    """Every stage of the recipe in order: the stages it reads and the config it reads."""
    world, with_sft = recipe.world_start, "sft" not in recipe.skip
    start = {} if world else {"start": recipe.start.model_dump(mode="json")}  # the base stage stands for the world's

    def config(*sections: str, roles: tuple[str, ...] = (), reads_start: bool = True) -> dict:
        c = {s: getattr(recipe, s).model_dump(mode="json") for s in sections}
        if roles:
            c["roles"] = {r: getattr(recipe.roles, r).model_dump(mode="json") for r in roles}
        return {**(start if reads_start else {}), **c}

    # The training stages' hash covers the evaluation sets their rows were checked against.
    checked = {"decontaminate": dc} if (dc := decontaminate.plan_config(recipe)) is not None else {}
    origin = ("base",) if world else ()
    stages: dict[str, tuple[tuple[str, ...], dict]] = {}
    if world:
        stages["base"] = ((), config("base"))
    for student in recipe.students:  # its own base model, trained like the world's
        shaped = recipe.base.model_copy(update={"model": student.model})
        stages[f"base-{student.name}"] = ((), {"base": shaped.model_dump(mode="json")})
    if with_sft:
        writers = ("teacher", "user_simulator") if recipe.dialogues.source is None else ()
        stages["dialogues"] = (origin, config("dialogues", roles=writers))
        stages["sft"] = (origin + ("dialogues",), {**config("sft"), **checked})
        for student in recipe.students:  # the same dialogues and settings
            stages[f"sft-{student.name}"] = ((f"base-{student.name}", "dialogues"), {**config("sft"), **checked})
    trained = origin + (("dialogues", "sft") if with_sft else ())
    if recipe.pairs.source is None:
        stages["completions"] = (trained, config("completions"))
        stages["ratings"] = (("completions",), config("rating", roles=("rater",), reads_start=False))
        stages["pairs"] = (("ratings",), config("pairs", reads_start=False))
    else:
        stages["pairs"] = ((), config("pairs", reads_start=False))
    dpo_names = []
    for v in recipe.variants:
        dpo_names.append(f"dpo-{v.name}")
        variant = {**v.model_dump(), "epochs": recipe.dpo_for(v).epochs}
        if v.loss is PreferenceLoss.SIMPO:  # the dpo section's dump has gamma only when its own loss is simpo
            variant["simpo_gamma"] = recipe.dpo.simpo_gamma
        if v.loss is PreferenceLoss.KTO:  # and the KTO weights only when its loss is kto
            variant.update(kto_desirable_weight=recipe.dpo.kto_desirable_weight,
                           kto_undesirable_weight=recipe.dpo.kto_undesirable_weight)
        sft_method, models = v.method == "sft", {v.start, v.reference or v.start}  # the start and the reference
        reads = (origin if sft_method or models - {"sft"} else ()) + (("sft",) if "sft" in models else ()) + ("pairs",)
        if sft_method:  # dSFT-2 trains with the sft section; of dpo's it reads only the seed (epochs: the variant's)
            reads_config = {**config("sft", reads_start=v.start != "sft"), "dpo": {"seed": recipe.dpo.seed}}
        else:
            reads_config = config("dpo", reads_start=bool(models - {"sft"}))
        if v.sft_data:  # ORPO on the dSFT data too: the dialogues, and the base model's corpus to replay
            reads = tuple(dict.fromkeys(origin + reads + ("dialogues",)))
            reads_config["sft"] = {k: getattr(recipe.sft, k) for k in ("replay_ratio", "seed", "skip_bad_rows")}
        if v.rows == "ratings":  # KTO on every rated completion of the pairs' training prompts
            reads += ("ratings",)
            reads_config["pairs"] = {k: getattr(recipe.pairs, k) for k in ("test_fraction", "dev_fraction", "seed")}
        stages[dpo_names[-1]] = (reads, {**reads_config, "variant": variant, **checked})
    read = [n for n in ("dialogues", "completions") if n in stages]  # prompts the held-out questions must avoid
    students = [f"sft-{s.name}" for s in recipe.students if with_sft]
    evaluated = [*(["sft"] if with_sft else []), *students, *dpo_names]
    # The dev split's evaluation has its own folder, so that choosing settings on dev leaves the test one be.
    stages[evaluation_stage(recipe)] = ((*origin, *read, *evaluated, "pairs"),
                                        {**config("evaluate", roles=("judge", "comparer")), "models": evaluated,
                                         "dpo": {k: getattr(recipe.dpo, k) for k in ("beta", "max_length")}})
    return stages


def evaluation_stage(recipe: RecipeConfig) -> str:
    return "evaluate" if recipe.evaluate.split == "test" else f"evaluate-{recipe.evaluate.split}"


class MissingInputError(RuntimeError):
    """A stage was asked for before the stage it reads from has completed."""


# The stages that train, and the recipe section holding each one's TrainConfig.
TRAINING = {"base": "base", "sft": "sft", "dpo": "dpo"}


def check_launch(recipe: RecipeConfig, names: list[str]) -> None:
    """Refuse, before any work, a global batch this launch's processes cannot split. (Every stage
    runs under a launch: the training stages split batches, the generating ones split their chunks
    and models, the rest run on rank 0 while the others wait.)"""
    processes = launched_processes()
    for name in names:
        if (section := TRAINING.get(name.split("-")[0])) is not None:
            getattr(recipe, section).batch_sizes(processes, section)


def stage_root(recipe: RecipeConfig, name: str) -> str:
    """The folder holding a stage's folder: the base stages may be shared by several runs (seeds)."""
    return recipe.shared_dir if recipe.shared_dir and name.split("-")[0] == "base" else recipe.run_dir


def run_stage(recipe: RecipeConfig, name: str, stages: dict | None = None) -> dict:
    """Run one stage unless its manifest says complete. Under a multi-process launch every
    process runs the stage and rank 0 alone writes its manifest."""
    stages = stages or plan(recipe)
    stage = Stage(stage_root(recipe, name), name, stages[name][1])
    main = is_main()
    if stage.done():
        if main:
            print(f"[{name}] complete in {stage.dir}, skipped")
            write_cards(recipe, name, stages)  # a run made before cards, or killed before its card
        return stage.read()
    inputs = {}
    for needed in stages[name][0]:
        upstream = Stage(stage_root(recipe, needed), needed, stages[needed][1])
        if not upstream.done():
            raise MissingInputError(f"stage {needed} has not completed in {stage_root(recipe, needed)}; run it "
                                    "first (dalign run)")
        inputs[needed] = upstream.dir
    if main:
        stage.start()
        # Temp files a killed run's atomic writes left behind (rows, parts, manifests): no process
        # of this run writes yet, the others wait at the barrier below.
        for stale in stage.dir.rglob(".*.tmp"):
            if stale.is_file():
                stale.unlink()
        print(f"[{name}] running in {stage.dir}")
    barrier()
    with serving.stage_servers():  # a server a role of this stage asked for lives as long as the stage
        facts = RUNNERS[name.split("-")[0]](recipe, stage.dir, inputs, *name.split("-", 1)[1:])
    if main:
        finished = stage.finish(recipe=recipe.name, inputs={k: str(v) for k, v in inputs.items()}, **facts)
        write_cards(recipe, name, stages)  # the hub cards; an evaluation refreshes its models'
        print(stage_summary(name, finished, stage.dir), flush=True)
    barrier()
    return stage.read()


def run_recipe(recipe: RecipeConfig, only: str | None = None) -> dict:
    """Every stage of the recipe, or those of the one named `only` (its inputs must have completed).
    With `seeds`, each seed's run in turn (the base stages once, shared); returns the last seed's.
    What can be refused is refused first; then the run directory is locked (by rank 0 of a
    launch) while the stages run: a second run on it is refused."""
    runs = [recipe.for_seed(s) for s in recipe.seeds] or [recipe]
    planned = [(run, *stages_to_run(run, only)) for run in runs]
    with RunLock(recipe.run_dir) if is_main() else contextlib.nullcontext():
        if is_main():  # what `dalign status` lists, the stages not started included
            write_plan(recipe.run_dir, [(run.run_dir, [(n, stage_root(run, n)) for n in stages]) for run, stages, _ in planned])
        return [{name: run_stage(run, name, stages) for name in names} for run, stages, names in planned][-1]


def stages_to_run(recipe: RecipeConfig, only: str | None) -> tuple[dict, list[str]]:
    """The recipe's plan and the stages of it to run, once everything that can be refused before
    any work has been checked."""
    stages = plan(recipe)
    if only in ("dpo", "sft", "base", "evaluate"):  # `dalign dpo` runs every variant, `dalign sft` every student
        names = [n for n in stages if n.split("-")[0] == only]
    else:
        names = list(stages) if only is None else [only]
    if only is not None and (not names or not set(names) <= set(stages)):
        raise ConfigError(f"this recipe has no stage {only}: its stages are {', '.join(stages)}")
    for section in ("sft", "dpo"):  # QLoRA without a GPU, say: before any stage
        check_lora(getattr(recipe, section).lora, section)
    for section in ("base", "sft", "dpo"):  # a tracker whose package is missing
        tracking.check(getattr(recipe, section).report_to, section)
    check_launch(recipe, names)
    return stages, names


def score_table(evaluation: dict, categories: bool = False) -> str:
    """Every evaluated model's figures as a Markdown table: the columns the evaluation has (the
    per-category scores only with `categories`: the console gets the narrow table, the report
    the categories)."""
    results = evaluation["results"]
    has = lambda key: any(key in r for r in results.values())  # noqa: E731
    cats = list(next((r["categories"] for r in results.values() if "categories" in r), {})) if categories else []
    correctness, k = has("greedy_accuracy"), evaluation["config"]["evaluate"]["pass_k"]
    columns = [("MT-Bench-style score (95% CI)", has("score"), lambda r: f"{r['score']:.2f} ± {r['ci95']:.2f}"),
               (f"win rate vs {evaluation.get('reference')} (LC)", has("win_rate"), lambda r: _rate(r.get("win_rate"))),
               ("greedy acc", correctness, lambda r: f"{r['greedy_accuracy']:.0%}"),
               (f"pass@{k}", correctness, lambda r: f"{r['pass_at_k']:.0%}"),
               ("held-out reward acc (pairs)", has("reward_accuracy"), lambda r: _reward(r.get("reward_accuracy")))]
    tasks = next((list(r["mc"]) for r in results.values() if "mc" in r), [])
    columns += [(f"{t} acc (norm)", True, lambda r, t=t: f"{r['mc'][t]['acc']:.2f} ({r['mc'][t]['acc_norm'] or float('nan'):.2f})")
                for t in tasks]
    columns += [(c, True, lambda r, c=c: f"{r['categories'][c]['score']:.1f}" + (
        f" ({r['categories'][c]['first_turn_correct']:.0%})" if correctness else "")) for c in cats]
    columns = [(name, cell) for name, shown, cell in columns if shown]
    lines = ["| model | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(cell(r) for _, cell in columns) + " |")
    return "\n".join(lines)


def _rate(w: dict | None) -> str:
    return f"{w['win_rate']:.1%} ± {w['ci95']:.1%} ({w['length_controlled_win_rate'] or float('nan'):.1%})" if w else "-"


def _reward(acc: dict | None) -> str:
    return f"{acc['reward_accuracy']:.1%} ± {acc['ci95']:.1%} ({acc['pairs']})" if acc else "-"
