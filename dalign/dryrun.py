"""`dalign run RECIPE --dry-run`: resolve every training stage's config and show what it will
cost, without loading a weight.

The model is built on the meta device from its config (the hub cache or the model folder,
else the recipe's `start.architecture`, so it works offline; the world's base model from
`base.model`). The number of processes and the
engine are the launch's (or --processes and --engine): the same numbers training will find.
For each training stage it prints the global batch and how it is split (the number that
silently changes with the GPU count if nobody states it; a recipe's `global_batch_size` keeps
it), the optimizer steps, and a memory estimate per GPU.
"""

from __future__ import annotations

import math

from dalign.config import TrainConfig
from dalign.parallel import Engine
from dalign.recipe import RecipeConfig

GIB = 1024 ** 3


def model_on_meta(recipe: RecipeConfig):
    """The base model with no storage behind its weights: a parameter count costs nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dalign.models import resolve

    if recipe.world_start:  # the base stage's shape; the vocabulary is at most its bound
        from transformers import LlamaConfig

        shape = recipe.base.model
        config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, intermediate_size=shape.intermediate_size,
                             max_position_embeddings=shape.max_position, tie_word_embeddings=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    start = recipe.start
    try:
        # With an architecture to fall back on, only the local cache is tried: a plan must not
        # wait on network retries.
        config = AutoConfig.from_pretrained(resolve(start.model), local_files_only=start.architecture is not None)
    except OSError:
        if start.architecture is None:
            raise
        arch = dict(start.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_state_bytes(params: int, trainable: int, cfg: TrainConfig, engine: Engine, processes: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and AdamW states. fp32 and autocast (DDP, FSDP2): 4-byte
    weights and gradients, 8 bytes of moments. DeepSpeed's 16-bit modes: 2-byte weights and
    gradients, 12 bytes of fp32 master copy and moments. ZeRO-2 splits gradients and optimizer
    states over the processes; ZeRO-3 and FSDP2 split the weights too."""
    sixteen_bit = engine.deepspeed and cfg.mixed_precision != "no"
    weight, grad, optim = (2, 2, 12) if sixteen_bit else (4, 4, 8)
    split = processes if engine is not Engine.DDP else 1
    return {"weights": params * weight / (processes if engine.shards_weights else 1),
            "gradients": trainable * grad / split, "optimizer": trainable * optim / split}


def activation_bytes(config, tokens: int, cfg: TrainConfig) -> float:
    """Rough bytes of what autograd keeps for one micro-batch of `tokens` tokens. Per token and
    block of a Llama-style model with a fused attention kernel (no tokens x tokens scores): the
    norm inputs, q, k, v, the attention output and the MLP's gate, up and product, about
    8h + 4 h_kv + 4i values. With activation checkpointing only each block's input (h values)
    is kept, plus one block being recomputed. The fp32 logits and their gradient come on top."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    h_kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    width = 4 if cfg.mixed_precision == "no" else 2
    per_block = (8 * h + 4 * h_kv + 4 * i) * tokens * width
    kept = layers * h * tokens * width + per_block if cfg.activation_checkpointing else layers * per_block
    return kept + 2 * tokens * config.vocab_size * 4


def dry_run(recipe: RecipeConfig, processes: int, engine: Engine) -> str:
    model = model_on_meta(recipe)
    params = sum(p.numel() for p in model.parameters())
    start = "the world's (pretrained by the base stage)" if recipe.world_start else recipe.start.model
    lines = [f"recipe {recipe.name}: base model {start} ({type(model).__name__}), "
             f"{params / 1e9:.2f}B parameters; {processes} processes, engine {engine.value}"]
    # Tokens of one micro-batch: packed SFT rows of max_length; a DPO pair at most twice max_length.
    # dDPO as the recipe's model is trained: its first variant's epochs.
    dpo = recipe.dpo_for(recipe.variants[0])
    for name, cfg, rows, seqs in (("sft", recipe.sft, recipe.dry_run.sft_rows, 1), ("dpo", dpo, recipe.dry_run.dpo_rows, 2)):
        if name in recipe.skip:
            lines.append(f"  {name}: skipped (skip)")
            continue
        sizes = cfg.batch_sizes(processes, name)
        if cfg.max_steps is None and not rows:
            lines.append(f"  {name}: global batch {sizes.global_batch}; steps unknown until its data is made "
                         f"(dry_run.{name}_rows plans them)")
            continue
        steps = math.ceil(rows * cfg.epochs / sizes.global_batch) if cfg.max_steps is None else cfg.max_steps
        trainable = params if cfg.lora is None else _lora_params(model, cfg.lora.rank)
        states = model_state_bytes(params, trainable, cfg, engine, processes)
        acts = activation_bytes(model.config, cfg.per_device_batch_size * seqs * cfg.max_length, cfg)
        total = (sum(states.values()) + acts) / GIB
        lines.append(
            f"  {name}: global batch {sizes.global_batch} = {sizes.per_device} per device x {sizes.accumulation} "
            f"accumulation x {processes} processes; {rows} rows x {cfg.epochs:g} epochs = {steps} steps; "
            f"lr {cfg.learning_rate:g}, max length {cfg.max_length}, mixed precision {cfg.mixed_precision}, "
            f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}; memory per GPU "
            f"~{total:.1f} GiB (weights {states['weights'] / GIB:.1f}, gradients {states['gradients'] / GIB:.1f}, "
            f"optimizer {states['optimizer'] / GIB:.1f}, activations {acts / GIB:.1f})")
        if name == "dpo" and cfg.lora is None:
            # Reference log-probs are computed before training, with a whole fp32 copy on each GPU.
            lines.append(f"  dpo reference log-probs (before training): ~{params * 4 / GIB:.1f} GiB per GPU")
    return "\n".join(lines)


def _lora_params(model, rank: int) -> int:
    """Parameters of rank-r adapters on every linear layer of the blocks (A: r x in, B: out x r)."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
