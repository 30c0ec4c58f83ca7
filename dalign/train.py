"""The training loop shared by pretraining, SFT and DPO, under every engine.

One explicit loop: plan the step's micro-batches, count label tokens (or pairs) across all of
them and all processes, forward, loss, backward, clip, step, log, checkpoint. The data order
is a pure function of (seed, step), the global batch is the recipe's whatever the number of
processes, and checkpoints hold weights, optimizer, schedule and step (dalign.checkpoints), so
a run stopped and resumed ends with exactly the weights of one run straight through. Which
engine wraps the model (DDP, FSDP2, DeepSpeed ZeRO) is the launch's choice (dalign.parallel).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from dalign import parallel, tracking
from dalign.chat import IGNORE
from dalign.checkpoints import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from dalign.config import TrainConfig
from dalign.console import Progress


@dataclass
class Example:
    """One training sequence: token ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Greedy packing in the given order: each bin holds examples totalling <= max_length."""
    bins, current, used = [], [], 0
    for ex in examples:
        if current and used + len(ex.input_ids) > max_length:
            bins.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        bins.append(current)
    return bins


def collate(rows: Sequence[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. A row of several examples is packed: position ids restart at each
    example and no attention mask is passed, which makes transformers attend within each
    example only (block-diagonal causal mask)."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    packed = any(len(row) > 1 for row in rows)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            labels[r, at:at + n] = torch.tensor(ex.labels)
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            labels[r, at] = IGNORE  # an example's first token is never predicted from the one before
            at += n
        # Padding continues the position count so it never looks like a new packed sequence.
        pos[r, at:] = torch.arange(at, width) - (at - len(row[-1].input_ids))
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packed:
        batch["attention_mask"] = mask
    return batch


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count (a packed batch,
    dalign.packed.collate_packed, computes logits only where a labelled token is predicted)."""
    if "dalign_spans" in batch:
        from dalign.packed import packed_logits

        targets = batch["targets"]
        return torch.nn.functional.cross_entropy(packed_logits(model, batch), targets, reduction="sum"), len(targets)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


class Objective(Protocol):
    """What a stage trains for. The loop averages the loss over `count` units of the whole
    step (label tokens for SFT, pairs for DPO), however it is split into micro-batches."""

    def count(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss summed over the batch's units, and metrics summed likewise (for the log)."""
        ...

    # Optional: begin_step(model, micro_batches, accelerator), called by every process before the
    # step's first micro-batch, for what the whole step shares (KTO's reference point).


class TokenObjective:
    """Next-token cross-entropy on labelled tokens (pretraining and SFT)."""

    def count(self, batch: dict) -> int:
        if "dalign_spans" in batch:
            return len(batch["targets"])
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return token_loss_sum(model, batch)[0], {}


class Plan:
    """Which rows each optimizer step sees: an epoch-seeded shuffle cut into global batches. The
    global batch, and so every step's rows, is the same however many processes share it."""

    def __init__(self, rows: Sequence, cfg: TrainConfig, processes: int, rank: int):
        self.rows, self.cfg, self.processes, self.rank = rows, cfg, processes, rank
        self.sizes = cfg.batch_sizes(processes)
        self.global_batch = self.sizes.global_batch
        self.steps_per_epoch = max(1, len(rows) // self.global_batch)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))

    def indices_for(self, step: int) -> list[int]:
        """This process's rows of the step, as positions in `rows`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.rows)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * self.global_batch:(index + 1) * self.global_batch]
        return chosen[self.rank::self.processes]

    def rows_for(self, step: int) -> list:
        return [self.rows[i] for i in self.indices_for(step)]

    def micro_indices(self, step: int) -> list[list[int]]:
        mine, n = self.indices_for(step), self.sizes.accumulation
        return [mine[i::n] for i in range(n) if mine[i::n]]

    def micro_batches(self, step: int) -> list[list]:
        return [[self.rows[i] for i in part] for part in self.micro_indices(step)]


def train(model, rows: Sequence, make_batch: Callable[[list], dict], cfg: TrainConfig, out: Path,
          objective: Objective = TokenObjective(), desc: str = "train",
          export: Callable[[torch.nn.Module, dict], None] | None = None) -> dict:
    """Train `model` on `rows` (collated by `make_batch`) under the engine of the launch; every
    process calls it. `export(model, state_dict)` runs on rank 0 alone at the end, with the full
    trained weights gathered from every process. Returns a summary for the manifest."""
    tracking.check(cfg.report_to, desc)
    sizes = cfg.batch_sizes(parallel.launched_processes(), desc)
    if len(rows) < sizes.global_batch and sizes.processes > 1:
        raise ValueError(f"{len(rows)} training rows are fewer than one global batch of {sizes.global_batch}: "
                         "some process would have nothing to train on")
    accelerator, engine = parallel.build_accelerator(cfg.mixed_precision, sizes.accumulation, cfg.max_grad_norm,
                                                     sizes.per_device)
    if cfg.skip_non_finite and engine.deepspeed:
        raise parallel.LaunchError(f"{desc}.skip_non_finite: DeepSpeed's engine takes its step inside the "
                                   "backward, so a step cannot be skipped after it; leave it false under DeepSpeed")
    plan = Plan(rows, cfg, sizes.processes, accelerator.process_index)
    warmup = int(cfg.warmup_ratio * plan.total_steps)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: same gradients, activations recomputed
    # Only what trains gets optimizer state: with LoRA adapters that is a small share of the model.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, plan.total_steps, warmup))
    # The schedule is not prepared: accelerate's wrapper would step it once per process each step.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # Collected after prepare: FSDP2 replaces each parameter by its shard.
    trainable = [p for p in model.parameters() if p.requires_grad]
    ckpt_dir, log_path = out / "checkpoints", out / "metrics.jsonl"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(ckpt_dir)
    accelerator.wait_for_everyone()
    start = 0
    if (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(accelerator, ckpt)
    if accelerator.is_main_process:
        _truncate_log(log_path, start)  # lines logged after the last checkpoint are written again
    model.train()
    bar = Progress(out.name, plan.total_steps, "steps", initial=start)
    # The trackers get each metrics.jsonl line; a resumed TensorBoard hides what an earlier attempt logged past `start`.
    trackers = tracking.start(cfg.report_to, out, start, accelerator.is_main_process, cfg.model_dump(mode="json"))
    window = Window()
    for step in range(start, plan.total_steps):
        parts = plan.micro_indices(step)  # row positions, kept to name the rows of a non-finite step
        micro = [to_device(make_batch([rows[i] for i in part]), accelerator.device) for part in parts]
        if hasattr(objective, "begin_step"):
            objective.begin_step(model, micro, accelerator)
        # Normalise by the units (tokens, pairs) of the whole step over every process, so that
        # each unit weighs the same however the step is split into micro-batches and processes.
        n_local = sum(objective.count(b) for b in micro)
        n_total = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), reduction="sum"))
        non_finite, losses = [], []  # this process's micro-batches whose loss is NaN or infinite; every loss
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            # Gradients are reduced (and DeepSpeed's engine steps) after the step's last micro-batch only.
            accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss_sum, metrics = objective.loss(model, batch)
                # The engines average gradients over processes and divide the loss by the
                # accumulation: multiply both back so the step's gradient is a mean per unit.
                accelerator.backward(loss_sum * sizes.processes * sizes.accumulation / max(1, n_total))
            losses.append((loss_sum.item(), metrics))  # the one sync a micro-batch needs, for the log and the check
            if not math.isfinite(losses[-1][0]):
                non_finite.append(i)
        grad_norm = parallel.clip_gradients(accelerator, engine, trainable, cfg.max_grad_norm)
        done = step + 1
        # Before the step can be checkpointed: the last good checkpoint stays the one to resume from.
        fault = non_finite_fault(accelerator, done, non_finite, parts, grad_norm,
                                 scaled=cfg.mixed_precision == "fp16")
        if fault is not None and not cfg.skip_non_finite:
            last = latest_checkpoint(ckpt_dir)
            raise NonFiniteError(f"{desc}: {fault}; nothing of this step was saved. "
                                 + (f"The last good checkpoint is {last}: a rerun resumes from it" if last else
                                    "No checkpoint yet: a rerun starts over")
                                 + " (lower the learning rate, or drop the rows named, first; or set skip_non_finite)")
        if fault is None:
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 overflow: the step did not happen, nor does the schedule's
                scheduler.step()
            for loss, metrics in losses:
                window.add(loss, metrics)
            window.tokens += sum(int(b["input_ids"].numel()) for b in micro)
            window.units += n_local
            window.steps += 1
        elif accelerator.is_main_process:  # skipped: no update, no schedule step, its own line in the log
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, "skipped": fault}) + "\n")
        optimizer.zero_grad(set_to_none=True)
        checkpoint = done % cfg.checkpoint_every == 0 or done == plan.total_steps
        # A line at every checkpoint too: a line never averages steps from before and after a resume.
        if (done % cfg.log_every == 0 or checkpoint) and window.steps:  # the same on every process
            line = {"step": done, **window.reduced(accelerator), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "epoch": done / plan.steps_per_epoch}
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                trackers.log(line)
                bar.postfix(loss=line["loss"])
            window = Window()
        if checkpoint:
            save_checkpoint(accelerator, ckpt_dir, done, cfg.keep_checkpoints)
        bar.update()
    bar.close()
    trackers.finish()
    state_dict = accelerator.get_state_dict(model)  # collective: the full weights, on rank 0
    if accelerator.is_main_process and export is not None:
        export(accelerator.unwrap_model(model), state_dict)
    accelerator.wait_for_everyone()
    parallel.end_training(accelerator)
    skipped = sum("skipped" in json.loads(line) for line in log_path.read_text().splitlines()) \
        if accelerator.is_main_process else 0
    return {"steps": plan.total_steps, **sizes.as_dict(), "engine": engine.value, "skipped_steps": skipped,
            "mixed_precision": cfg.mixed_precision, "activation_checkpointing": cfg.activation_checkpointing,
            "rows": len(rows), "steps_per_epoch": plan.steps_per_epoch, "resumed_from_step": start}


class NonFiniteError(RuntimeError):
    """A training step's loss or gradient is NaN or infinite."""


def non_finite_fault(accelerator, step: int, non_finite: list[int], micro_indices: list[list[int]],
                     grad_norm: float, scaled: bool) -> str | None:
    """What is not finite in this step, the same answer on every process (so all stop, or all
    skip, together): any process's loss, or the gradient norm (the same on every process). Under
    fp16 an infinite gradient is the loss scaler's to handle (it skips the step and lowers the
    scale), so only the loss counts."""
    bad_grad = not scaled and not math.isfinite(grad_norm)
    flags = accelerator.reduce(torch.tensor([float(bool(non_finite)), float(bad_grad)], device=accelerator.device),
                               reduction="sum")
    if not bool(flags.any()):
        return None
    rows = sorted(i for m in non_finite for i in micro_indices[m])
    what = (f"the loss is not finite in micro-batch(es) {non_finite} (training rows {rows}, 0-based positions in "
            "this stage's rows)" if non_finite else "the loss is not finite on another process" if flags[0] else
            f"the gradient norm is {grad_norm}")
    return f"step {step}: {what}"


class Window:
    """What the steps since the last log line add up to on this process; `reduced` gives the
    means over every process (per unit: token or pair) and the global tokens per second."""

    def __init__(self):
        self.loss, self.units, self.tokens, self.metrics, self.started = 0.0, 0, 0, {}, time.perf_counter()
        self.steps = 0  # optimizer steps taken (skipped ones are not)

    def add(self, loss: float, metrics: dict[str, float]) -> None:
        self.loss += loss
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def reduced(self, accelerator) -> dict[str, float]:
        keys = sorted(self.metrics)
        local = torch.tensor([self.loss, self.units, self.tokens, *(self.metrics[k] for k in keys)],
                             dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum").tolist()
        units = max(1.0, total[1])
        return {"loss": total[0] / units, "tokens_per_second": total[2] / (time.perf_counter() - self.started),
                **{k: v / units for k, v in zip(keys, total[3:])}}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the training device (a no-op on the CPU)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
