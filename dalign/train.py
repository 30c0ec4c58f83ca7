"""The training loop shared by pretraining, SFT and (later) DPO.

One explicit loop: plan the step's micro-batches, count label tokens across all of them,
forward, loss, backward, clip, step, log, checkpoint. The data order is a pure function of
(seed, step), and checkpoints hold weights, optimizer, schedule and step, so a run stopped
and resumed ends with exactly the weights of one run straight through.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from dalign.chat import IGNORE
from dalign.config import TrainConfig


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


class TokenObjective:
    """Next-token cross-entropy on labelled tokens (pretraining and SFT)."""

    def count(self, batch: dict) -> int:
        if "dalign_spans" in batch:
            return len(batch["targets"])
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return token_loss_sum(model, batch)[0], {}


class Plan:
    """Which rows each optimizer step sees: an epoch-seeded shuffle cut into global batches."""

    def __init__(self, rows: Sequence, cfg: TrainConfig, processes: int, rank: int):
        self.rows, self.cfg, self.processes, self.rank = rows, cfg, processes, rank
        self.global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation * processes
        self.steps_per_epoch = max(1, len(rows) // self.global_batch)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))

    def rows_for(self, step: int) -> list:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.rows)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * self.global_batch:(index + 1) * self.global_batch]
        mine = chosen[self.rank::self.processes]
        return [self.rows[i] for i in mine]

    def micro_batches(self, step: int) -> list[list]:
        rows, n = self.rows_for(step), self.cfg.gradient_accumulation
        return [rows[i::n] for i in range(n) if rows[i::n]]


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint exists whole or not at all


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("step-*") if (p / "state.json").exists() and not p.name.endswith(".tmp")]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def train(model, rows: Sequence, make_batch: Callable[[list], dict], cfg: TrainConfig, out: Path,
          objective: Objective = TokenObjective(), desc: str = "train") -> dict:
    """Train `model` on `rows` (collated by `make_batch`); returns a summary for the manifest."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plan = Plan(rows, cfg, accelerator.num_processes, accelerator.process_index)
    warmup = int(cfg.warmup_ratio * plan.total_steps)
    # Only what trains gets optimizer state: with LoRA adapters that is a small share of the model.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, plan.total_steps, warmup))
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt_dir, log_path = out / "checkpoints", out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    if (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"))
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = json.loads((ckpt / "state.json").read_text())["step"]
    _truncate_log(log_path, start)  # lines logged after the last checkpoint are written again
    model.train()
    bar = tqdm(range(start, plan.total_steps), desc=desc, initial=start, total=plan.total_steps,
               disable=not accelerator.is_main_process)
    # Logged values are means over the steps since the last log line (per unit: token or pair).
    window_tokens, window_start, window_loss, window_units, window_metrics = 0, time.perf_counter(), 0.0, 0, {}
    for step in bar:
        micro = [to_device(make_batch(rows), accelerator.device) for rows in plan.micro_batches(step)]
        # Normalise by the units (tokens, pairs) of the whole step, on every process, so that
        # each unit weighs the same however the batch is split into micro-batches.
        n_local = sum(objective.count(b) for b in micro)
        n_total = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), reduction="sum"))
        for i, batch in enumerate(micro):
            sync = accelerator.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                loss_sum, metrics = objective.loss(model, batch)
                # DDP averages gradients over processes; multiply back so the sum is per unit.
                accelerator.backward(loss_sum * accelerator.num_processes / max(1, n_total))
            window_loss += loss_sum.item()
            for k, v in metrics.items():
                window_metrics[k] = window_metrics.get(k, 0.0) + v
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += sum(int(b["input_ids"].numel()) for b in micro)
        window_units += n_local
        done = step + 1
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == plan.total_steps):
            elapsed = time.perf_counter() - window_start
            line = {"step": done, "loss": window_loss / max(1, window_units), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens_per_second": window_tokens / elapsed,
                    "epoch": done / plan.steps_per_epoch,
                    **{k: v / max(1, window_units) for k, v in window_metrics.items()}}
            with log_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            bar.set_postfix(loss=f"{line['loss']:.3f}")
            window_tokens, window_start, window_loss, window_units, window_metrics = 0, time.perf_counter(), 0.0, 0, {}
        if done % cfg.checkpoint_every == 0 or done == plan.total_steps:
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir / f"step-{done}", accelerator.unwrap_model(model), optimizer, scheduler, done)
            accelerator.wait_for_everyone()
    return {"steps": plan.total_steps, "global_batch_size": plan.global_batch, "processes": accelerator.num_processes,
            "rows": len(rows), "steps_per_epoch": plan.steps_per_epoch, "resumed_from_step": start}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the training device (a no-op on the CPU)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
