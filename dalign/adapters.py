"""LoRA and QLoRA adapters (PEFT) for the training stages.

With adapters only the low-rank matrices train; the starting weights stay frozen, so the
DPO reference is the same model with its adapters switched off. QLoRA also keeps the
frozen weights in 4-bit NF4 through bitsandbytes, which runs on CUDA GPUs only: a recipe
that asks for it elsewhere is refused by `check` before any model is loaded or row read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dalign.config import ConfigError, LoraConfig
from dalign.models import load_weights


def check(lora: LoraConfig | None, where: str) -> None:
    """Refuse at once what cannot run on this machine or launch (`where` names the recipe section)."""
    if lora is None:
        return
    from dalign.parallel import launched_engine

    if launched_engine().shards_weights:
        raise ConfigError(f"{where}.lora under {launched_engine().value}: adapters train under DDP (one or several "
                          "GPUs, each holding the frozen model); launch with configs/accelerate/ddp.yaml, or "
                          f"drop {where}.lora to train every weight under a sharding engine")
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{where}.lora needs the peft package: pip install peft")
    if lora.load_in_4bit:
        missing = [need for need, ok in (("the bitsandbytes package (pip install bitsandbytes)",
                                          importlib.util.find_spec("bitsandbytes") is not None),
                                         ("a CUDA GPU", torch.cuda.is_available())) if not ok]
        if missing:
            raise ConfigError(f"{where}.lora.load_in_4bit (QLoRA) needs {' and '.join(missing)}, which this "
                              f"machine lacks; set {where}.lora.load_in_4bit: false for plain LoRA")


def load_trainable(path: str | Path, lora: LoraConfig | None, seed: int = 0):
    """The model to train from `path`: every weight, or frozen weights (4-bit for QLoRA) with adapters,
    initialised from `seed` (the A matrices are random), so a rerun starts from the same adapters.
    Weights load in fp32 whatever the checkpoint holds: transformers keeps a bf16 checkpoint in
    bf16, and AdamW steps of 5e-7 on bf16 weights round away; mixed precision (autocast, or
    DeepSpeed's 16-bit mode with its fp32 master copy) is the training stage's to apply."""
    if lora is None:
        return load_weights(path, dtype=torch.float32)
    import peft

    if lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = load_weights(path, quantization_config=quant, device_map={"": 0})
        model = peft.prepare_model_for_kbit_training(model)
    else:
        model = load_weights(path, dtype=torch.float32)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                      target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def save_trained(model, start: str | Path | None, lora: LoraConfig | None, out: Path,
                 state_dict: dict | None = None) -> None:
    """Save `out/model` as a plain transformers model (adapters merged in) and the adapters alone
    in `out/adapter`; `state_dict`: the full weights gathered from a sharding engine (the model
    object then holds only this process's shard). A 4-bit model is merged into a full-precision
    copy of the start: merging into rounded weights would add the rounding error to every weight."""
    if lora is None:
        save_full(model, out / "model", state_dict)
        return
    model.save_pretrained(out / "adapter")
    if lora.load_in_4bit:
        import peft

        full = load_weights(start, dtype=torch.bfloat16)
        model = peft.PeftModel.from_pretrained(full, out / "adapter")
    model.merge_and_unload().save_pretrained(out / "model")


def exporter(start: str | Path | None, lora: LoraConfig | None, out: Path, tokenizer):
    """The `export` a training stage hands to dalign.train.train: rank 0, once training is over,
    saves `out/model` (save_trained) with the tokenizer beside it."""
    def export(trained, state_dict: dict) -> None:
        save_trained(trained, start, lora, out, state_dict)
        tokenizer.save_pretrained(out / "model")

    return export


def save_full(model, folder: Path, state_dict: dict | None = None) -> None:
    """A transformers model folder from the weights an engine gathered. Gathered tensors no longer
    share storage, so the copies of tied weights (the output head of a model with tied
    embeddings) are dropped, as save_pretrained drops them from a model's own state dict."""
    if state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if k not in getattr(model, "all_tied_weights_keys", {})}
    model.save_pretrained(folder, state_dict=state_dict)
