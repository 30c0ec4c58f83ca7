"""SFT and DPO, dalign against TRL, on the same model weights, rows, batch, length and optimizer.

Each function trains one epoch over the rows and returns the wall time, the useful tokens
(non-padding tokens of every sequence the trainer had to process: prompt + answer for SFT,
prompt + chosen and prompt + rejected for DPO), the peak memory and the loss at initialisation
on the same first rows (the same work is being done when those agree).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from dalign.chat import IGNORE
from dalign.config import DPOConfig, SFTConfig
from dalign.dpo import Pair, PreferenceObjective, collate_pairs, pair_logps
from dalign.losses import PreferenceLoss
from dalign.packed import collate_packed, collate_packed_pairs, packed_attention
from dalign.parallel import autocast
from dalign.train import Example, collate, pack, token_loss_sum, train

LR = 1e-4


def _settings(max_length: int) -> dict:
    return dict(learning_rate=LR, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_length=max_length,
                epochs=1, checkpoint_every=10**9, log_every=10**9, seed=0,
                mixed_precision="bf16" if common.GPU else "no")


def _peer_settings() -> dict:
    """TRL's arguments for this machine: fp32 on a CPU (its bf16 default raises there), bf16 and
    Liger where there is a GPU."""
    _, liger = common.peer_gpu_options()
    return dict(bf16=common.GPU, use_cpu=not common.GPU, use_liger_kernel=liger)


def sft_examples(rows: list[common.Row]) -> list[Example]:
    return [Example(r.prompt + r.chosen, [IGNORE] * len(r.prompt) + r.chosen) for r in rows]


def dalign_sft(size: str, rows: list[common.Row], batch: int, max_length: int) -> dict:
    """dalign's SFT as the product runs it: examples packed into rows of max_length, attention
    kept within each example; batches of packed rows holding as many tokens as `batch` examples."""
    examples = sft_examples(rows)
    bins = pack(examples, max_length)
    per_step = max(1, round(batch * len(bins) / len(examples)))
    cfg = SFTConfig(per_device_batch_size=per_step, **_settings(max_length))
    model = common.model(size, max_length)
    with torch.no_grad():
        loss, count = token_loss_sum(model, collate([[e] for e in examples[:batch]], common.PAD))
    first = loss.item() / count  # the mean over the first rows' answer tokens, as TRL logs it
    with tempfile.TemporaryDirectory() as out, common.PeakMemory() as mem, packed_attention(model):
        start = time.perf_counter()
        train(model, bins, collate_packed, cfg, Path(out), desc="dalign sft")  # as dalign.sft runs it
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "useful_tokens": sum(len(e.input_ids) for e in examples), "peak_gib": mem.gib,
            "first_loss": first}


def trl_sft(size: str, rows: list[common.Row], batch: int, max_length: int, padding_free: bool) -> dict:
    import datasets
    import trl

    examples = sft_examples(rows)
    data = datasets.Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(x != IGNORE) for x in e.labels]}
                                       for e in examples])
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, **_peer_settings(), activation_checkpointing=False,
                             per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="cosine",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[],
                             save_strategy="no", dataloader_num_workers=0, completion_only_loss=True,
                             padding_free=padding_free, max_length=None if padding_free else max_length, seed=0)
        model = common.model(size, max_length, attention=common.peer_gpu_options()[0])
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=common.tokenizer())
        _in_order(trainer)
        with common.PeakMemory() as mem:
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
    first = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return {"seconds": seconds, "useful_tokens": sum(len(e.input_ids) for e in examples), "peak_gib": mem.gib,
            "first_loss_logged": first}


def dpo_pairs(rows: list[common.Row]) -> list[Pair]:
    def example(prompt, answer):
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer)

    return [Pair(example(r.prompt, r.chosen), example(r.prompt, r.rejected)) for r in rows]


def dalign_dpo(size: str, rows: list[common.Row], batch: int, max_length: int, packed: bool) -> dict:
    """dalign's dDPO as run_dpo runs it: reference log-probs computed once (timed), then the loop."""
    pairs = dpo_pairs(rows)
    cfg = DPOConfig(per_device_batch_size=batch, beta=0.1, packed=packed, **_settings(max_length))
    model, objective = common.model(size, max_length), PreferenceObjective(0.1, PreferenceLoss.SIGMOID)
    collate_fn = collate_packed_pairs if packed else lambda chunk: collate_pairs(chunk, common.PAD)
    with tempfile.TemporaryDirectory() as out, common.PeakMemory() as mem:
        start = time.perf_counter()
        reference = copy.deepcopy(model).eval().to(common.DEVICE)  # a frozen copy, as the product loads one
        with torch.no_grad(), packed_attention(reference, packed), autocast(common.DEVICE, cfg.mixed_precision):
            for pair, (c, r) in zip(pairs, pair_logps(reference, pairs, batch, common.PAD, packed=packed)):
                pair.ref_chosen, pair.ref_rejected = c, r
        del reference
        setup = time.perf_counter() - start
        with packed_attention(model, packed):
            with torch.no_grad():
                first = objective.loss(copy.deepcopy(model), collate_fn(pairs[:batch]))[0].item() / batch
            train(model, pairs, collate_fn, cfg, Path(out), objective=objective, desc="dalign dpo")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "reference_seconds": setup, "peak_gib": mem.gib, "first_loss": first,
            "useful_tokens": sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)}


def trl_dpo(size: str, rows: list[common.Row], batch: int, max_length: int, precompute: bool) -> dict:
    import datasets
    import trl

    data = datasets.Dataset.from_list([{"prompt": common.text(r.prompt), "chosen": " " + common.text(r.chosen),
                                        "rejected": " " + common.text(r.rejected)} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(output_dir=out, **_peer_settings(), activation_checkpointing=False, beta=0.1,
                             loss_type=["sigmoid"], per_device_train_batch_size=batch, num_train_epochs=1,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                             dataloader_num_workers=0, precompute_ref_log_probs=precompute,
                             precompute_ref_batch_size=batch, max_length=max_length, seed=0)
        model = common.model(size, max_length, attention=common.peer_gpu_options()[0])
        with common.PeakMemory() as mem:
            start = time.perf_counter()  # the precompute runs inside the constructor: it is timed
            trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                                     processing_class=common.tokenizer())
            _in_order(trainer)
            trainer.train()
            seconds = time.perf_counter() - start
    first = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    tokens = sum(2 * len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)
    return {"seconds": seconds, "useful_tokens": tokens, "peak_gib": mem.gib, "first_loss_logged": first}


def _in_order(trainer) -> None:
    """Batches in row order, so TRL's first logged loss is on the rows dalign's is computed on."""
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
