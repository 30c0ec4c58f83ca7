"""KTO in the dpo stage: unpaired rows, each a completion labelled desirable or undesirable.

KTO (Ethayarajh et al.) compares each row's log-ratio r = log pi - log ref with a reference
point z0, an estimate of KL(pi || ref) made from mismatched (prompt, completion) sequences:
each row's prompt with another row's completion. Here a row's mismatched completion is that of
the row before it in one seeded cycle over all rows, so the estimate's completions are the
rows' own, each with another prompt (TRL rotates them within each device batch instead). z0 is
the mean over the mismatched sequences of the step's whole global batch, every micro-batch
and process, floored at 0 and detached (dalign.losses.kto_reference_point): the same however
a step is split, so two processes train as one does. With one process and no accumulation it
is TRL's (tests/test_kto_trl.py).

A row and its mismatched sequence share the prompt, so they travel as a dalign.dpo.Pair
(chosen: the row, rejected: the mismatched sequence): the packed prefix-sharing batches and the
cached reference log-probs of DPO serve KTO unchanged.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from dalign.dpo import Pair, completion_example, sequence_logps
from dalign.losses import kto_loss, kto_reference_point
from dalign.train import Example


@dataclass
class UnpairedRow(Pair):
    """`chosen`: the row's own sequence; `rejected`: its prompt with the mismatched completion;
    `ref_chosen`/`ref_rejected`: their reference log-probs."""

    desirable: bool = True


def make_rows(rows: list[dict], tokenizer, max_length: int, dropped: Counter, seed: int) -> list[UnpairedRow]:
    """Tokenized rows (longer than max_length: dropped, counted) with their mismatched sequences,
    cut at max_length (they only estimate z0)."""
    kept = []
    for row in rows:
        example = completion_example(tokenizer, row["prompt"], row["completion"])
        if len(example.input_ids) > max_length:
            dropped["too_long"] += 1
            continue
        kept.append((row, example))
    if len(kept) < 2:
        raise ValueError(f"KTO needs at least two rows to mismatch prompts and completions; {len(kept)} left")
    cycle = mismatch_cycle(len(kept), seed)
    before = {cycle[k]: cycle[k - 1] for k in range(len(cycle))}  # each row's predecessor in the cycle
    made = []
    for i, (row, example) in enumerate(kept):
        other = completion_example(tokenizer, row["prompt"], kept[before[i]][0]["completion"])
        mismatched = Example(other.input_ids[:max_length], other.labels[:max_length])
        made.append(UnpairedRow(example, mismatched, desirable=bool(row["label"])))
    return made


def mismatch_cycle(n: int, seed: int) -> list[int]:
    """The seeded cycle over n rows: row cycle[k]'s mismatched completion is row cycle[k - 1]'s."""
    cycle = list(range(n))
    random.Random(seed).shuffle(cycle)
    return cycle


def labelled(collate_fn):
    """A pair collate function that also passes each row's label (`desirable`, bools)."""
    def collate(rows: list[UnpairedRow]) -> dict:
        return {**collate_fn(rows), "desirable": torch.tensor([r.desirable for r in rows])}
    return collate


class KTOObjective:
    """The loop's objective for KTO, averaged over rows: the loop calls `begin_step` with the
    step's micro-batches before any of them trains, which sets z0 for the step.

    Logged per row (the loop's log divides every sum by the step's rows): `kl` is z0,
    `desirable` the desirable share, `rewards/desirable` and `rewards/undesirable` the rewards
    beta * r summed over that label's rows (divide by the share for the label's mean)."""

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.weights = beta, (desirable_weight, undesirable_weight)
        self.reference_point = torch.zeros(())

    def count(self, batch: dict) -> int:
        return len(batch["desirable"])

    @torch.no_grad()
    def begin_step(self, model, micro: list[dict], accelerator) -> None:
        policy, reference = [], []
        for batch in micro:
            n = self.count(batch)
            policy.append(sequence_logps(model, batch)[n:].double())
            reference.append(batch["ref_rejected"].to(policy[-1].device))
        # Every process has as many rows a step: the gathered tensors are the global batch's.
        self.reference_point = kto_reference_point(accelerator.gather(torch.cat(policy)),
                                                   accelerator.gather(torch.cat(reference)))

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n, desirable = self.count(batch), batch["desirable"].bool()
        logps = sequence_logps(model, batch)[:n]
        losses, rewards = kto_loss(logps, batch["ref_chosen"].to(logps.dtype), desirable,
                                   self.reference_point.to(logps.dtype), self.beta, *self.weights)
        undesirable = ~desirable
        return losses.sum(), {"kl": self.reference_point.item() * n, "desirable": desirable.sum().item(),
                              "rewards/desirable": rewards[desirable].sum().item(),
                              "rewards/undesirable": rewards[undesirable].sum().item(),
                              "logps/desirable": logps.detach()[desirable].sum().item(),
                              "logps/undesirable": logps.detach()[undesirable].sum().item()}
