"""Running a recipe on a real model (a `real:` section): the Zephyr recipe's stages on a
Hugging Face model, with OpenAI-compatible servers as teacher, user simulator, ensemble
members and judge, or with datasets standing in for what they would write.

  dialogues  ultrachat-style dialogues read from `real.dialogues`, or written by the teacher
             and the prompted user simulator from `real.topics`
  sft        dSFT (full or LoRA) from `real.model`
  completions, ratings, pairs
             AI feedback: the `completions` members answer `real.prompts`, the teacher rates,
             the `pairs` section binarizes; or pairs read from `real.pairs`
  dpo        dDPO from the dSFT model (or `real.model` when sft is skipped)
  evaluate   held-out reward accuracy; MT-Bench and AlpacaEval with `real.judge`; multiple choice
             before and after

The stages keep the offline recipe's contract: one folder each under run_dir, a manifest
with the resolved config and its hash, skipped when complete, resumed when killed (server
replies are cached in the stage folder, so a rerun pays for none twice).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dalign import adapters
from dalign import run as offline
from dalign.backends import Sampling
from dalign.completions import Member, run_completions
from dalign.config import ConfigError, RecipeConfig
from dalign.data import read_rows, write_json, write_rows
from dalign.dpo import make_pairs, pair_logps, run_dpo
from dalign.evaluate import evaluate_mt_bench, mean_ci
from dalign.generate import run_dialogues
from dalign.generation import LocalModel
from dalign.models import load_model, load_tokenizer, resolve
from dalign.rate import run_rating
from dalign.readers import ReadReport, read_alpaca_eval, read_dialogues, read_mt_bench, read_preferences, read_prompts
from dalign.sft import run_sft
from dalign.winrate import win_rate

# The `real` fields each stage reads: a change to another field (the judge, say) reruns only
# the stages that read it.
FIELDS = {
    "dialogues": ("model", "chat_template", "dialogues", "topics", "teacher", "user_simulator"),
    "sft": ("model", "chat_template"),
    "completions": ("model", "chat_template", "prompts"),
    "ratings": ("teacher",),
    "pairs": ("pairs", "held_out"),
    "dpo": ("model",),
    "evaluate": ("model", "chat_template", "judge", "mt_bench", "alpaca_eval", "mc"),
}


def plan(recipe: RecipeConfig) -> dict[str, tuple[tuple[str, ...], dict]]:
    real = recipe.real.model_dump(mode="json")

    def config(stage: str, *sections: str) -> dict:
        return {"real": {k: real[k] for k in FIELDS[stage]},
                **{s: getattr(recipe, s).model_dump(mode="json") for s in sections}}

    stages: dict[str, tuple[tuple[str, ...], dict]] = {}
    if "sft" not in recipe.real.skip:
        stages["dialogues"] = ((), config("dialogues", "dialogues"))
        stages["sft"] = (("dialogues",), config("sft", "sft"))
    trained = ("sft",) if "sft" in stages else ()
    if recipe.real.pairs is None:
        stages["completions"] = (trained, config("completions", "completions"))
        stages["ratings"] = (("completions",), config("ratings", "rating"))
        stages["pairs"] = (("ratings",), config("pairs", "pairs"))
    else:
        stages["pairs"] = ((), config("pairs"))
    if "dpo" not in recipe.real.skip:
        stages["dpo"] = (trained + ("pairs",), config("dpo", "dpo"))
    stages["evaluate"] = (tuple(stages), config("evaluate", "evaluate"))
    return stages


def check(recipe: RecipeConfig) -> None:
    """What the recipe lacks, said before any stage starts."""
    real = recipe.real
    if "sft" not in real.skip and real.dialogues is None and (real.teacher is None or not real.topics):
        raise ConfigError("dSFT needs dialogues: set real.dialogues (a dataset), or real.teacher and real.topics "
                          "to have them written (or skip it: real.skip: [sft])")
    if real.pairs is None:
        if real.prompts is None or real.teacher is None:
            raise ConfigError("dDPO needs preference pairs: set real.pairs (a dataset), or real.prompts and "
                              "real.teacher for AI feedback")
        world = [m.name for m in recipe.completions.members if m.flaws is not None]
        if world:
            raise ConfigError(f"completions.members {world} are offline-world generators, which answer only the "
                              "world's prompts: give real members (model: or openai:)")
        if "sft" in real.skip and any(m.model == "sft" for m in recipe.completions.members):
            raise ConfigError("a completions member uses model 'sft' but real.skip has sft")
    elif real.held_out is None:
        raise ConfigError("with real.pairs, set real.held_out too (preference pairs kept apart for the reward accuracy)")
    if real.judge is not None and real.mt_bench is None and real.alpaca_eval is None:
        raise ConfigError("real.judge is set but nothing to judge: set real.mt_bench and/or real.alpaca_eval")
    if real.judge is None and (real.mt_bench is not None or real.alpaca_eval is not None):
        raise ConfigError("MT-Bench and AlpacaEval need a judge: set real.judge")
    for section in ("sft", "dpo"):
        if section not in real.skip:
            adapters.check(getattr(recipe, section).lora, section)


def run(recipe: RecipeConfig, only: str | None = None) -> dict:
    """Every stage of the recipe, or the one named `only` (its inputs must have completed)."""
    check(recipe)
    stages = plan(recipe)
    if only is not None and only not in stages:
        raise ConfigError(f"this recipe has no stage {only}: its stages are {', '.join(stages)}")
    names = list(stages) if only is None else [only]
    offline.check_launch(recipe, names)
    return {name: offline.run_stage(recipe, name, stages, RUNNERS) for name in names}


def _server(config, out: Path, name: str):
    from dalign.openai_backend import OpenAIBackend

    return OpenAIBackend.for_stage(config, out, name)


def _read_report(source, reader, out: Path, filename: str) -> dict:
    report = ReadReport(source.label)
    write_rows(out / filename, reader(source, skip_bad=True, report=report))
    return report.as_dict()


def _dialogues(recipe, out: Path, inputs) -> dict:
    real = recipe.real
    if real.dialogues is not None:
        read = _read_report(real.dialogues, read_dialogues, out, "dialogues.jsonl")
        return {"rows": {"kept": read["kept"], "dropped": read["dropped"]}, "source": read}
    from dalign.prompted import PromptedUser

    tokenizer = load_tokenizer(real.model, real.chat_template)
    teacher = _server(real.teacher, out, "teacher")
    user = PromptedUser(_server(real.user_simulator or real.teacher, out, "user-simulator-model"))
    facts = run_dialogues(recipe.dialogues, tokenizer, user, teacher, out, topics=real.topics)
    return {"seeds": {"sampling": recipe.dialogues.seed}, **facts, **offline.backend_facts([teacher, user.model])}


def _sft(recipe, out: Path, inputs) -> dict:
    real = recipe.real
    tokenizer = load_tokenizer(real.model, real.chat_template)
    facts = run_sft(recipe.sft, resolve(real.model), inputs["dialogues"] / "dialogues.jsonl", out, None, tokenizer)
    return {"seeds": {"data_order": recipe.sft.seed}, "start": real.model, **facts}


def _completions(recipe, out: Path, inputs) -> dict:
    real, cfg = recipe.real, recipe.completions
    report = ReadReport(real.prompts.label)
    prompts = read_prompts(real.prompts, skip_bad=True, report=report)
    if not prompts:
        raise ValueError(f"{real.prompts.label}: no prompt left for AI feedback (dropped: {dict(report.dropped)})")
    models = {"start": resolve(real.model), **{k: v / "model" for k, v in inputs.items()}}
    members = [Member(m.name, offline.member_backend(m, models, out, real.chat_template),
                      Sampling(m.temperature, cfg.max_new_tokens, cfg.seed)) for m in cfg.members]
    facts = run_completions(prompts, members, cfg.per_prompt, cfg.principles, cfg.chunk_size, cfg.seed, out)
    facts["rows"]["dropped"] = dict(report.dropped)
    return {"seeds": {"members_and_principles": cfg.seed}, "source": report.as_dict(), **facts,
            **offline.backend_facts(m.backend for m in members)}


def _ratings(recipe, out: Path, inputs) -> dict:
    teacher = _server(recipe.real.teacher, out, "teacher")
    rows = read_rows(inputs["completions"] / "completions.jsonl")
    facts = run_rating(rows, teacher, recipe.rating.retries, recipe.rating.chunk_size, recipe.rating.seed, out)
    return {"seeds": {"shown_order": recipe.rating.seed}, **facts, **offline.backend_facts([teacher])}


def _pairs(recipe, out: Path, inputs) -> dict:
    real = recipe.real
    if real.pairs is None:  # AI feedback: binarize the ratings, as the offline recipe does
        facts = offline.RUNNERS["pairs"](recipe, out, inputs)
        if real.held_out is not None:  # a fixed held-out set replaces the split's test part
            facts["test"] = _read_report(real.held_out, read_preferences, out, "test.jsonl")
        return facts
    read = {split: _read_report(source, read_preferences, out, f"{split}.jsonl")
            for split, source in (("train", real.pairs), ("test", real.held_out))}
    return {"rows": {"kept": read["train"]["kept"] + read["test"]["kept"],
                     "dropped": {f"{s}:{k}": v for s in read for k, v in read[s]["dropped"].items()}}, **read}


def _start(recipe, inputs) -> Path:
    """The model dDPO starts from and keeps as its reference."""
    return inputs["sft"] / "model" if "sft" in inputs else Path(resolve(recipe.real.model))


def _dpo(recipe, out: Path, inputs) -> dict:
    start = _start(recipe, inputs)
    return {"start": str(start), **run_dpo(recipe.dpo, start, start, inputs["pairs"] / "train.jsonl", out)}


@torch.no_grad()
def reward_accuracy(policy_path, reference_path, pairs_path: Path, beta: float, max_length: int) -> dict:
    """Share of held-out pairs whose implicit reward beta * log(policy / reference) is higher
    for the chosen answer than for the rejected one, with a 95% interval."""
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    dropped: Counter = Counter()
    pairs = make_pairs(read_rows(pairs_path), tokenizer, max_length, dropped)
    margins = {label: [c - r for c, r in pair_logps(load_model(path).eval(), pairs, 8, tokenizer.pad_token_id)]
               for label, path in (("policy", policy_path), ("reference", reference_path))}
    wins = [float(beta * (p - r) > 0) for p, r in zip(margins["policy"], margins["reference"])]
    rate, half = mean_ci(wins)
    return {"reward_accuracy": rate, "ci95": half, "pairs": len(wins), "too_long": dropped["too_long"]}


def _evaluate(recipe, out: Path, inputs) -> dict:
    real = recipe.real
    start = _start(recipe, inputs)
    trained = inputs["dpo"] / "model" if "dpo" in inputs else start
    facts = {}
    if "dpo" in inputs:
        facts["held_out"] = reward_accuracy(trained, start, inputs["pairs"] / "test.jsonl", recipe.dpo.beta,
                                            recipe.dpo.max_length)
        write_json(out / "reward_accuracy.json", facts["held_out"], indent=1)
    models = {"start": resolve(real.model), **{k: inputs[k] / "model" for k in ("sft", "dpo") if k in inputs}}
    if real.judge is not None:
        judge = _server(real.judge, out, "judge")
        if real.mt_bench is not None:
            facts["mt_bench"] = _mt_bench(recipe, models, judge, out)
        if real.alpaca_eval is not None:
            facts["alpaca_eval"] = _alpaca_eval(recipe, models, judge, out)
        facts.update(offline.backend_facts([judge]))
    if real.mc is not None:
        from dalign.mc import MCConfig, run_mc

        for label, model in (("before", start), ("after", trained)):
            facts[f"mc_{label}"] = run_mc(MCConfig(model=str(model), **real.mc), out / f"mc_{label}")["results"]
    return facts


def _local(recipe, path, label: str) -> LocalModel:
    return LocalModel.load(path, recipe.evaluate.batch_size, label, recipe.real.chat_template)


def _mt_bench(recipe, models: dict, server, out: Path) -> dict:
    """MT-Bench through the prompted judge, one result file per model (a rerun skips finished ones)."""
    from dalign.prompted import PromptedJudge

    summary, questions, judge = {}, read_mt_bench(recipe.real.mt_bench), PromptedJudge(server)
    for label, path in models.items():
        result_path = out / f"mt_bench_{label}.json"
        if not result_path.exists():
            model = _local(recipe, path, label)
            result = evaluate_mt_bench(model, judge, questions, recipe.evaluate, correctness=False)
            result["generation"] = model.throughput()
            write_json(result_path, result, indent=1)
        result = json.loads(result_path.read_text())
        summary[label] = {k: result[k] for k in ("score", "ci95", "categories", "judge_failures", "questions")}
    return summary


def _alpaca_eval(recipe, models: dict, judge, out: Path) -> dict:
    """Each model's greedy answers to the AlpacaEval instructions against the reference outputs,
    judged in both orders (dalign.winrate); answers and verdicts are kept per model."""
    rows = read_alpaca_eval(recipe.real.alpaca_eval)
    instructions, reference = [r["instruction"] for r in rows], [r["output"] for r in rows]
    greedy, summary = Sampling(0.0, recipe.evaluate.max_new_tokens, recipe.evaluate.seed), {}
    for label, path in models.items():
        answers_path, result_path = out / f"alpaca_answers_{label}.json", out / f"alpaca_eval_{label}.json"
        if not answers_path.exists():
            write_json(answers_path, _local(recipe, path, label).generate(
                [[{"role": "user", "content": i}] for i in instructions], greedy), indent=1)
        if not result_path.exists():
            write_json(result_path, win_rate(instructions, json.loads(answers_path.read_text()), reference, judge), indent=1)
        result = json.loads(result_path.read_text())
        summary[label] = {k: result[k] for k in ("win_rate", "ci95", "length_controlled_win_rate", "wins", "ties",
                                                 "losses", "judge_failures")}
    return {"reference": rows[0]["generator"] if rows else None, "results": summary}


RUNNERS = {"dialogues": _dialogues, "sft": _sft, "completions": _completions, "ratings": _ratings, "pairs": _pairs,
           "dpo": _dpo, "evaluate": _evaluate}
