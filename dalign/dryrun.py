"""`dalign run RECIPE --dry-run` for a recipe on a real model: resolve every training stage's
config and show what it will cost, without loading a weight.

The model is built on the meta device from its config (the hub cache or the model folder,
else the recipe's `real.architecture`, so it works offline). For each training stage it
prints the global batch (per-device batch x gradient accumulation x processes: the number
that silently changes with the GPU count if nobody states it), the optimizer steps, and a
memory estimate per GPU under the recipe's sharding.
"""

from __future__ import annotations

import math

from dalign.config import ConfigError, RecipeConfig

GIB = 1024 ** 3
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def model_on_meta(recipe: RecipeConfig):
    """The base model with no storage behind its weights: a parameter count costs nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dalign.models import resolve

    real = recipe.real
    try:
        # With an architecture to fall back on, only the local cache is tried: a plan must not
        # wait on network retries.
        config = AutoConfig.from_pretrained(resolve(real.model), local_files_only=real.architecture is not None)
    except OSError:
        if real.architecture is None:
            raise
        arch = dict(real.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def memory_per_gpu(params: int, trainable: int, recipe: RecipeConfig, with_reference: bool) -> dict[str, float]:
    """GiB per GPU for weights, gradients and AdamW states (mixed precision: fp32 master weights,
    first and second moments), sharded over the processes under ZeRO-3 / full-shard FSDP.
    Activations depend on the kernels and checkpointing and are not included."""
    real = recipe.real
    shard = real.processes if real.sharding in ("zero3", "fsdp") else 1
    width = BYTES[real.dtype]
    weights = params * width * (2 if with_reference else 1)  # the frozen reference is a second copy
    grads = trainable * width / (shard if real.sharding in ("zero2", "zero3", "fsdp") else 1)
    optim = trainable * 12 / (shard if real.sharding != "none" else 1)
    est = {"weights": weights / shard / GIB, "gradients": grads / GIB, "optimizer": optim / GIB}
    est["total"] = sum(est.values())
    return est


def dry_run(recipe: RecipeConfig) -> str:
    real = recipe.real
    if real is None:
        raise ConfigError("--dry-run needs a recipe with a `real:` section (a Hugging Face base model)")
    model = model_on_meta(recipe)
    params = sum(p.numel() for p in model.parameters())
    lines = [f"recipe {recipe.name}: base model {real.model} ({type(model).__name__}), "
             f"{params / 1e9:.2f}B parameters, {real.dtype}, {real.processes} processes, sharding {real.sharding}"]
    for name, cfg, rows, ref in (("sft", recipe.sft, real.sft_rows, False), ("dpo", recipe.dpo, real.dpo_rows, True)):
        if name in real.skip:
            lines.append(f"  {name}: skipped (real.skip)")
            continue
        batch = cfg.per_device_batch_size * cfg.gradient_accumulation * real.processes
        steps = math.ceil(rows * cfg.epochs / batch) if cfg.max_steps is None else cfg.max_steps
        trainable = params if cfg.lora is None else _lora_params(model, cfg.lora.rank)
        # With adapters the reference is the same weights with the adapters off: no second copy.
        mem = memory_per_gpu(params, trainable, recipe, with_reference=ref and cfg.lora is None)
        lines.append(
            f"  {name}: global batch {batch} = {cfg.per_device_batch_size} per device x {cfg.gradient_accumulation} "
            f"accumulation x {real.processes} processes; {rows} rows x {cfg.epochs:g} epochs = {steps} steps; "
            f"lr {cfg.learning_rate:g}, max length {cfg.max_length}; memory per GPU ~{mem['total']:.1f} GiB "
            f"(weights {mem['weights']:.1f}, gradients {mem['gradients']:.1f}, optimizer {mem['optimizer']:.1f}; "
            f"activations not included)")
    return "\n".join(lines)


def _lora_params(model, rank: int) -> int:
    """Parameters of rank-r adapters on every linear layer of the blocks (A: r x in, B: out x r)."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
