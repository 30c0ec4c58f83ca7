"""The model card of a stage's model/ (or its LoRA adapter/): metadata the hub reads (base model,
datasets, library, tags, license, model-index), then how it was trained, its provenance, its
evaluation rows and how to load it. Written by dalign.cards.write_cards."""

from __future__ import annotations

from dalign.cards import (LICENSE, RunStages, dataset_name, decontamination_text, finite, fmt, hub_id, model_name,
                          provenance_lines, render, rows_text, value_text)


def model_card(recipe, name: str, stages: dict, adapter: bool = False) -> str:
    """The card of stage `name`'s model/ (or, with `adapter`, of its LoRA adapter/)."""
    run = RunStages(recipe, stages)
    manifest, kind = run.manifest(name), name.split("-")[0]
    config = training_config(name, manifest["config"])
    parent, parent_text, parent_path = start_of(recipe, name, manifest, stages)
    origin = hub_id(recipe.start.model) if not recipe.world_start else None
    # base_model must be a hub id: the adapter's is the model it loads onto (its start); the merged
    # model's is where the lineage leaves the hub (the recipe's start model). A model of this run
    # (the world's base, this run's sft) or a local folder has none: the field is left out.
    base_model = (parent if adapter else origin)
    datasets = [d for d in (dataset_name(run, n) for n in stages[name][0]) if d]
    evaluations = run.evaluations(name)
    metadata = {**({"base_model": base_model} if base_model else {}), **({"datasets": datasets} if datasets else {}),
                "library_name": "peft" if adapter else "transformers", "license": LICENSE,
                "pipeline_tag": "text-generation", "tags": model_tags(kind, manifest, config, adapter)}
    if index := model_index(recipe.name, name, evaluations):
        metadata["model-index"] = index
    lineage = "the world's base model is pretrained in this run" if recipe.world_start else \
        f"the start model {model_name(recipe.start.model)} is a local folder"
    comments = [] if base_model else [f"base_model left out, it must be a hub id: {parent_text if adapter else lineage}"
                                      + (" has none" if adapter else "")]
    comments.append(f"license: {LICENSE}, as no recipe field sets one; set the terms of the start model, the teacher "
                    "and the data sources before uploading")
    what = "LoRA adapter" if adapter else "model"
    body = [f"# {recipe.name} / {name}" + (" (LoRA adapter)" if adapter else ""), "",
            f"A {what} of the dalign recipe `{recipe.name}`: {method_text(name, manifest, config)}, "
            f"from {parent_text}. It was made by stage `{name}` (folder `{run.where(name)}/` of the run directory)."]
    body += ["", "## Training", "", "| setting | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in training_rows(kind, manifest, config)]
    body += ["", f"Rows: {rows_text(manifest.get('rows'))}."]
    if (checked := manifest.get("decontamination")) is not None:
        body.append(f"Decontamination: {decontamination_text(checked)}.")
    body += ["", "## Provenance", ""] + provenance_lines(run, name, manifest)
    body += ["", "## Evaluation", ""] + evaluation_lines(name, evaluations)
    body += ["", "## How to use", ""] + usage_lines(run.where(name), adapter, parent_path)
    body += ["", "## License", "", f"`{LICENSE}` until set: the terms of the start model, of the teacher and rater "
             "whose outputs it learned from, and of the data sources apply."]
    return render(metadata, comments, body)


def training_config(name: str, config: dict) -> dict:
    """The training section a stage ran with, as its manifest records it: a dDPO variant's
    epochs, learning rate and beta over the dpo section's; a method-sft variant's over sft's."""
    kind = name.split("-")[0]
    if kind != "dpo":
        return config[kind]
    variant = config["variant"]
    if variant.get("method") == "sft":
        return {**config["sft"], "epochs": variant["epochs"], "seed": config["dpo"]["seed"],
                "learning_rate": variant.get("learning_rate") or config["sft"]["learning_rate"]}
    own = ("epochs", "learning_rate", "beta", "loss", "simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight")
    return {**config["dpo"], **{k: variant[k] for k in own if variant.get(k) is not None}}


def start_of(recipe, name: str, manifest: dict, stages: dict) -> tuple[str | None, str, str | None]:
    """The model stage `name` trained from: its hub id (None if it has none), how the card names it,
    and what from_pretrained loads it by (None for random weights)."""
    reads = stages[name][0]
    own = [n for n in reads if n.split("-")[0] in ("base", "sft")]
    if name.split("-")[0] == "dpo" and manifest["config"]["variant"]["start"] == "sft":
        own = ["sft"]
    elif name.split("-")[0] == "dpo":
        own = [n for n in own if n.split("-")[0] == "base"]
    if own:
        return None, f"this run's model of stage `{own[0]}`", f"{RunStages(recipe, stages).where(own[0])}/model"
    if name.split("-")[0] == "base":
        return None, "randomly initialised weights", None
    spec = recipe.start.model
    return hub_id(spec), f"the recipe's start model `{hub_id(spec) or model_name(spec)}`", hub_id(spec) or model_name(spec)


def method_text(name: str, manifest: dict, config: dict) -> str:
    kind = name.split("-")[0]
    if kind == "base":
        return (f"a Llama model pretrained from scratch on {manifest.get('corpus_tokens', '?')} tokens of the offline "
                f"world's text, standing for the paper's base model")
    if kind == "sft" or manifest.get("method") == "sft":
        data = "the teacher's dialogues" if kind == "sft" else "the chosen answers of the preference pairs (dSFT-2)"
        replay = f", {config['replay_ratio']:g} of the sequences replaying pretraining text" if config.get("replay_ratio") else ""
        return f"distilled supervised fine-tuning (dSFT) on {data}, loss on the assistant turns{replay}"
    if config["loss"] in ("simpo", "orpo"):  # dalign.losses.PreferenceLoss.needs_reference
        data = " and the dSFT data (its NLL alone)" if manifest["config"].get("variant", {}).get("sft_data") else ""
        return f"preference optimisation with the reference-free {config['loss']} loss on AI-feedback preference pairs{data}"
    if config["loss"] == "kto":  # dalign.losses.PreferenceLoss.needs_pairs
        data = ("unpaired rows read from pairs.source" if manifest.get("rows_from") == "source"
                else "unpaired AI-feedback completions")
        return f"KTO on {data} labelled desirable or undesirable, the starting model as the frozen reference"
    return (f"distilled direct preference optimisation (dDPO, {config['loss']} loss) on AI-feedback preference pairs, "
            "the starting model as the frozen reference")


def model_tags(kind: str, manifest: dict, config: dict, adapter: bool) -> list[str]:
    method = {"base": ["pretraining"], "sft": ["sft"], "dpo": ["sft"] if manifest.get("method") == "sft" else ["dpo"]}
    tags = ["dalign", "zephyr-recipe", *method[kind]]
    if kind != "base":
        tags += ["distillation", "conversational"]
    if config.get("lora") is not None:
        tags += ["lora", "peft"] if adapter else ["lora"]
    return tags


def training_rows(kind: str, manifest: dict, config: dict) -> list[tuple[str, str]]:
    rows = [("learning rate", value_text(config["learning_rate"])), ("epochs", value_text(config["epochs"]))]
    if config.get("max_steps") is not None:
        rows.append(("max steps", value_text(config["max_steps"])))
    if "beta" in config:
        rows += [("beta", value_text(config["beta"])), ("loss", config["loss"])]
        if config.get("chosen_nll"):
            rows.append(("chosen NLL weight (RPO)", value_text(config["chosen_nll"])))
    rows += [("global batch", f"{manifest.get('global_batch_size')} (per device {manifest.get('per_device_batch_size')}"
                              f" x accumulation {manifest.get('gradient_accumulation')} x {manifest.get('processes')} "
                              f"process{'' if manifest.get('processes') == 1 else 'es'}, {manifest.get('engine')})"),
             ("optimizer steps", value_text(manifest.get("steps"))), ("max length", value_text(config["max_length"])),
             ("warmup ratio", value_text(config["warmup_ratio"])), ("weight decay", value_text(config["weight_decay"])),
             ("mixed precision", config["mixed_precision"])]
    if kind == "base":
        shape = config["model"]
        rows += [("architecture", f"Llama, hidden {shape['hidden_size']}, {shape['layers']} layers, {shape['heads']} "
                                  f"heads, MLP {shape['intermediate_size']}"),
                 ("parameters", value_text(manifest.get("parameters"))), ("vocabulary", value_text(manifest.get("vocab_size"))),
                 ("corpus", f"{config['corpus_documents']} world documents")]
    else:
        rows.append(("packing", value_text(config.get("packing", config.get("packed")))))
        rows.append(("LoRA", _lora(config.get("lora"))))
    rows.append(("seed", value_text(config["seed"])))
    return rows


def _lora(lora: dict | None) -> str:
    if lora is None:
        return "no: every weight trained"
    targets = lora["target_modules"] if isinstance(lora["target_modules"], str) else ", ".join(lora["target_modules"])
    return (f"rank {lora['rank']}, alpha {value_text(lora['alpha'])}, dropout {value_text(lora['dropout'])}, on {targets}"
            + (", 4-bit NF4 frozen weights (QLoRA)" if lora.get("load_in_4bit") else "") + "; merged into model/")


def model_index(recipe_name: str, name: str, evaluations: list[tuple[str, dict]]) -> list[dict]:
    """The hub's model-index: each evaluation's figures for this model, full precision."""
    results = []
    for where, evaluation in evaluations:
        result, split = evaluation["results"][name], evaluation.get("split", "test")
        questions = "MT-Bench questions file" if evaluation["config"]["evaluate"].get("mt_bench") else \
            f"MT-Bench-style world questions, {split} split"
        benchmarks = [("mt_bench", questions, [("mt_bench_score", "MT-Bench-style score", result.get("score"))] +
                       [(k, label, result.get(k)) for k, label in (("first_turn_correct", "first-turn correct"),
                                                                    ("greedy_accuracy", "greedy accuracy"),
                                                                    ("pass_at_k", f"pass@{evaluation['config']['evaluate']['pass_k']}"))]),
                      ("win_rate", f"AlpacaEval-style win rate against {evaluation.get('reference')}, {split} split",
                       [("win_rate", "win rate", (result.get("win_rate") or {}).get("win_rate")),
                        ("length_controlled_win_rate", "length-controlled win rate",
                         (result.get("win_rate") or {}).get("length_controlled_win_rate"))]),
                      ("reward_accuracy", f"held-out preference pairs, {split} split",
                       [("reward_accuracy", "reward accuracy", (result.get("reward_accuracy") or {}).get("reward_accuracy"))])]
        benchmarks += [(task, task, [("acc", "accuracy", r.get("acc")), ("acc_norm", "normalised accuracy", r.get("acc_norm"))])
                       for task, r in (result.get("mc") or {}).items()]
        for dataset, benchmark_name, metrics in benchmarks:
            given = [{"type": t, "name": n, "value": v} for t, n, v in metrics if finite(v)]
            if given:
                results.append({"task": {"type": "text-generation"},
                                # a seed's evaluation of a shared model says which seed it is
                                "dataset": {"type": dataset, "split": split,
                                            "name": benchmark_name + (f" ({where})" if "/" in where else "")},
                                "metrics": given})
    return [{"name": f"{recipe_name}-{name}", "results": results}] if results else []


def evaluation_lines(name: str, evaluations: list[tuple[str, dict]]) -> list[str]:
    if not evaluations:
        return ["Not evaluated yet: the recipe's evaluation stage rewrites this card when it has scored the model."]
    lines = []
    for where, evaluation in evaluations:
        r = evaluation["results"][name]
        lines += [f"From stage `{where}` ({evaluation.get('split', 'test')} split; judge {evaluation.get('judge')}, "
                  f"comparer {evaluation.get('comparer')}):", "", "| metric | value |", "|---|---|"]
        if "score" in r:
            lines.append(f"| MT-Bench-style score (1-10, 95% CI) | {fmt(r['score'], '.2f')} ± {fmt(r['ci95'], '.2f')} "
                         f"({r['questions']} questions, {r['judge_failures']} judge failures) |")
        for key, label in (("first_turn_correct", "first-turn correct"), ("greedy_accuracy", "greedy accuracy"),
                           ("pass_at_k", f"pass@{evaluation['config']['evaluate']['pass_k']}")):
            if key in r:
                lines.append(f"| {label} | {fmt(r[key], '.1%')} |")
        if w := r.get("win_rate"):
            lines.append(f"| win rate vs {evaluation.get('reference')} (95% CI; length-controlled) | "
                         f"{fmt(w['win_rate'], '.1%')} ± {fmt(w['ci95'], '.1%')}; {fmt(w['length_controlled_win_rate'], '.1%')}"
                         f" ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses) |")
        if a := r.get("reward_accuracy"):
            lines.append(f"| held-out reward accuracy (95% CI) | {fmt(a['reward_accuracy'], '.1%')} ± {fmt(a['ci95'], '.1%')}"
                         f" ({a['pairs']} pairs) |")
        for task, m in (r.get("mc") or {}).items():
            lines.append(f"| {task} accuracy (normalised) | {fmt(m.get('acc'), '.3f')} ({fmt(m.get('acc_norm'), '.3f')}) |")
        if categories := r.get("categories"):
            lines.append("| score by category | " + ", ".join(f"{c} {fmt(v['score'], '.2f')}" for c, v in categories.items())
                         + " |")
        lines.append("")
    return lines[:-1]


def usage_lines(where: str, adapter: bool, parent_path: str | None) -> list[str]:
    folder = f"{where}/adapter" if adapter else f"{where}/model"
    if adapter:
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f"# the model it was trained on (the run directory's folder, or its hub id); {where}/model holds it merged in",
                f'start = AutoModelForCausalLM.from_pretrained("{parent_path}")',
                f'model = PeftModel.from_pretrained(start, "{folder}")  # this folder, or its hub id', "```"]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'path = "{folder}"  # this folder (from the run directory), or its hub id once uploaded',
            "model = AutoModelForCausalLM.from_pretrained(path)",
            "tokenizer = AutoTokenizer.from_pretrained(path)  # with the chat template it was trained with", "```", "",
            f"Or chat with it in a terminal: `dalign chat {folder}`."]
