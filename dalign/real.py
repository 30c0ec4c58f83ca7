"""Running a recipe on a real model (a `real:` section): preference pairs from a dataset,
dDPO (LoRA or full), and evaluation by held-out reward accuracy and multiple-choice
benchmarks before and after.

The stages keep the offline recipe's contract: one folder each under run_dir, a manifest
with the resolved config and its hash, skipped when complete, resumed when killed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dalign.config import ConfigError, RecipeConfig
from dalign.data import read_rows, write_json, write_rows
from dalign.dpo import make_pairs, pair_logps, run_dpo
from dalign.evaluate import mean_ci
from dalign.models import load_model, resolve
from dalign.readers import ReadReport, read_preferences
from dalign.run import run_stage


def plan(recipe: RecipeConfig) -> dict[str, tuple[tuple[str, ...], dict]]:
    real = recipe.real.model_dump(mode="json")
    stages = {"pairs": ((), {"real": real})}
    if "dpo" not in recipe.real.skip:
        stages["dpo"] = (("pairs",), {"real": real, "dpo": recipe.dpo.model_dump(mode="json")})
    stages["evaluate"] = (tuple(stages), {"real": real})
    return stages


def run(recipe: RecipeConfig) -> dict:
    real = recipe.real
    if "sft" not in real.skip:
        raise ConfigError("on a real model this version runs dDPO on an instruction-tuned model: set real.skip: [sft]")
    if real.pairs is None or real.held_out is None:
        raise ConfigError("a real recipe needs real.pairs and real.held_out (preference data sources)")
    stages = plan(recipe)
    return {name: run_stage(recipe, name, stages, RUNNERS) for name in stages}


def _pairs(recipe, out: Path, inputs) -> dict:
    facts = {}
    for split, source in (("train", recipe.real.pairs), ("test", recipe.real.held_out)):
        report = ReadReport(source.label)
        rows = read_preferences(source, skip_bad=True, report=report)
        write_rows(out / f"{split}.jsonl", rows)
        facts[split] = report.as_dict()
    return {"rows": {"kept": facts["train"]["kept"] + facts["test"]["kept"],
                     "dropped": {f"{s}:{k}": v for s in facts for k, v in facts[s]["dropped"].items()}}, **facts}


def _dpo(recipe, out: Path, inputs) -> dict:
    start = Path(resolve(recipe.real.model))
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
    from dalign.mc import MCConfig, run_mc

    start = resolve(recipe.real.model)
    trained = inputs["dpo"] / "model" if "dpo" in inputs else Path(start)
    facts = {"held_out": reward_accuracy(trained, start, inputs["pairs"] / "test.jsonl", recipe.dpo.beta,
                                         recipe.dpo.max_length)}
    write_json(out / "reward_accuracy.json", facts["held_out"], indent=1)
    if recipe.real.mc is not None:
        for label, model in (("before", start), ("after", str(trained))):
            facts[f"mc_{label}"] = run_mc(MCConfig(model=str(model), **recipe.real.mc), out / f"mc_{label}")["results"]
    return facts


RUNNERS = {"pairs": _pairs, "dpo": _dpo, "evaluate": _evaluate}
