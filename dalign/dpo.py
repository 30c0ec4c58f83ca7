"""Stage 2b: distilled DPO on preference pairs, the dSFT model as frozen reference (or a variant:
another preference loss, dalign.losses; KTO on unpaired rows, dalign.kto; SFT on the chosen answers).

The loop is the shared one (`dalign.train.train`) with a preference objective. Reference
log-probs are computed once, before training, and stored with a hash of the reference
weights and the pairs that produced them, so a resumed or repeated run reuses them and a
changed input never silently does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dalign.chat import IGNORE, TemplateError, prompt_ids, tokenize_dialogue
from dalign import adapters
from dalign.config import DPOConfig
from dalign.data import read_rows, validate_preference, validate_unpaired, write_json
from dalign.models import load_weights
from dalign.losses import PreferenceLoss, preference_loss
from dalign.packed import collate_packed_pairs, packed_attention, packed_token_logps
from dalign.parallel import autocast, gather_shares, process_state
from dalign.train import Example, collate, to_device, train


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0
    nll_only: bool = False  # a dSFT sequence beside ORPO's pairs (nll_rows): `chosen` alone counts


def nll_rows(examples: list[Example]) -> list[Pair]:
    """dSFT sequences as rows whose only loss is the NLL of their labelled tokens (ORPO trained on
    the dSFT data and the pairs at once). The `rejected` side is a stub, the sequence up to its
    first labelled token: the packed batch scores it, the objective never reads it."""
    rows = []
    for ex in examples:  # a replayed text is labelled from its first token, which nothing predicts
        head = next(k for k, t in enumerate(ex.labels) if t != IGNORE and k > 0)
        own = Example(ex.input_ids, [IGNORE] * head + ex.labels[head:])
        rows.append(Pair(own, Example(ex.input_ids[:head + 1], own.labels[:head + 1]), nll_only=True))
    return rows


def completion_example(tokenizer, prompt: list[dict], completion: list[dict]) -> Example:
    """Prompt + completion tokens with labels on the completion only. The prompt's tokens
    must be exactly a prefix of the whole, or the log-probs would score the wrong tokens."""
    head = prompt_ids(tokenizer, prompt)
    whole = tokenize_dialogue(tokenizer, prompt + completion)
    if whole.input_ids[:len(head)] != head:
        raise TemplateError("the tokenized prompt is not a prefix of prompt + completion")
    return Example(whole.input_ids, [IGNORE] * len(head) + whole.labels[len(head):])


def make_pairs(rows: list[dict], tokenizer, max_length: int, dropped: Counter) -> list[Pair]:
    pairs = []
    for row in rows:
        chosen = completion_example(tokenizer, row["prompt"], row["chosen"])
        rejected = completion_example(tokenizer, row["prompt"], row["rejected"])
        if max(len(chosen.input_ids), len(rejected.input_ids)) > max_length:
            dropped["too_long"] += 1
            continue
        pairs.append(Pair(chosen, rejected))
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows, in one batch of 2B sequences."""
    batch = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id)
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)
    batch["nll_only"] = torch.tensor([p.nll_only for p in pairs])
    return batch


def sequence_logps(model, batch: dict, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(token) over each row's labelled tokens, shape (rows,); for a
    packed batch (dalign.packed), over each scored sequence's, in the same order."""
    if "dalign_spans" in batch:
        token_logps, sequence = packed_token_logps(model, batch)
        total = torch.zeros(2 * len(batch["ref_chosen"]), dtype=token_logps.dtype,
                            device=token_logps.device).index_add(0, sequence, token_logps)
        return total / answer_tokens(batch).clamp(min=1) if mean else total
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


@torch.no_grad()
def pair_logps(model, pairs: list[Pair], batch_size: int, pad_id: int, mean: bool = False,
               packed: bool = False) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probs of each pair under a model, in batches of pairs (packed
    batches need the model inside dalign.packed.packed_attention)."""
    values = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_device(collate_packed_pairs(chunk) if packed else collate_pairs(chunk, pad_id), model.device)
        logps = sequence_logps(model, batch, mean=mean).tolist()
        values += list(zip(logps[:len(chunk)], logps[len(chunk):]))
    return values


def answer_tokens(batch: dict) -> torch.Tensor:
    """Labelled tokens of each scored sequence of a padded or packed batch."""
    if "dalign_spans" in batch:
        return torch.bincount(batch["sequence"], minlength=2 * len(batch["ref_chosen"]))
    return (batch["labels"][:, 1:] != IGNORE).sum(-1)


class PreferenceObjective:
    """The loop's objective for DPO and its variants: averaged over pairs (and over the dSFT rows
    ORPO may train on beside them, each its mean NLL; the log's per-row means then count those rows
    too, and `pairs` gives the pairs' share).

    `chosen_nll` adds that weight times the chosen answer's mean token negative log-likelihood
    (as RPO does), which keeps the chosen log-probs from falling along with the rejected."""

    def __init__(self, beta: float, variant: PreferenceLoss, chosen_nll: float = 0.0, gamma: float = 0.0):
        self.beta, self.variant, self.chosen_nll, self.gamma = beta, variant, chosen_nll, gamma

    def count(self, batch: dict) -> int:
        return len(batch["ref_chosen"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.count(batch)
        logps = sequence_logps(model, batch, mean=self.variant.length_normalized)
        pair = ~batch["nll_only"].to(logps.device) if "nll_only" in batch \
            else torch.ones(n, dtype=torch.bool, device=logps.device)
        chosen, rejected = logps[:n][pair], logps[n:][pair]
        losses, r_chosen, r_rejected = preference_loss(chosen, rejected, batch["ref_chosen"][pair].to(chosen.dtype),
                                                       batch["ref_rejected"][pair].to(chosen.dtype), self.beta,
                                                       self.variant, self.gamma)
        margin = r_chosen - r_rejected
        if self.chosen_nll:
            n_tokens = answer_tokens(batch)[:n][pair].clamp(min=1)
            mean_logps = chosen if self.variant.length_normalized else chosen / n_tokens
            losses = losses - self.chosen_nll * mean_logps
        # A dSFT row's loss: the mean NLL of its labelled tokens (ORPO's logps are means), as ORPO's own.
        total = losses.sum() - logps[:n][~pair].sum()
        return total, {"rewards/chosen": r_chosen.sum().item(), "rewards/rejected": r_rejected.sum().item(),
                       "rewards/margin": margin.sum().item(), "rewards/accuracy": (margin > 0).sum().item(),
                       "logps/chosen": chosen.detach().sum().item(), "logps/rejected": rejected.detach().sum().item(),
                       **({"pairs": int(pair.sum())} if not pair.all() else {})}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(reference_path: Path, pairs: list[Pair], pairs_path: Path, cfg: DPOConfig, cache: Path,
                    pad_id: int, adapted=None) -> str:
    """Fill each pair's reference log-probs, from the cache when it was made from the same inputs.

    Under a multi-process launch each process scores every world-th pair (rank, rank + world, ...)
    and the shares are gathered once; rank 0 writes the cache. `adapted`: a policy with LoRA
    adapters over the reference weights; it is used with its adapters switched off instead of
    loading a second copy of the model."""
    weights = sorted(reference_path.glob("*.safetensors"))  # one file, or the shards of a large model
    key = hashlib.sha256(json.dumps({"weights": [_file_hash(w) for w in weights],
                                     "pairs": _file_hash(pairs_path), "max_length": cfg.max_length,
                                     "mean": cfg.loss.length_normalized,
                                     "mixed_precision": cfg.mixed_precision}).encode()).hexdigest()
    if cache.exists() and (stored := json.loads(cache.read_text()))["key"] == key:
        values = stored["logps"]
    else:
        state = process_state()
        # fp32 weights like the policy's (dalign.adapters.load_trainable) and products at the
        # training precision, so that at step 0 policy and reference agree.
        model = (adapted or load_weights(reference_path, dtype=torch.float32)).to(state.device)
        mine = pairs[state.process_index::state.num_processes]
        with adapted.disable_adapter() if adapted is not None else contextlib.nullcontext(), \
                packed_attention(model, cfg.packed), autocast(state.device, cfg.mixed_precision):
            scored = pair_logps(model.eval(), mine, cfg.per_device_batch_size, pad_id, cfg.loss.length_normalized,
                                cfg.packed)
        values = gather_shares(scored, len(pairs))
        if state.is_main_process:
            write_json(cache, {"key": key, "logps": values})
        state.wait_for_everyone()
    for pair, (c, r) in zip(pairs, values):
        pair.ref_chosen, pair.ref_rejected = c, r
    return key


def run_dpo(cfg: DPOConfig, policy_path: Path, reference_path: Path, pairs_path: Path, out: Path,
            sft_data: list[Example] | None = None) -> dict:
    """DPO or one of its variants on the pairs of `pairs_path`; KTO (a loss that needs no pairs)
    on the unpaired rows of that file (dalign.kto). `sft_data`: dSFT sequences ORPO trains on beside
    the pairs, each with its NLL alone (nll_rows)."""
    from dalign import kto  # it builds on this module

    adapters.check(cfg.lora, "dpo")
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    dropped: Counter = Counter()
    if cfg.loss.needs_pairs:
        pairs = make_pairs(read_rows(pairs_path, validate=validate_preference), tokenizer, cfg.max_length, dropped)
        objective = PreferenceObjective(cfg.beta, cfg.loss, cfg.chosen_nll, cfg.simpo_gamma)
    else:
        pairs = kto.make_rows(read_rows(pairs_path, validate=validate_unpaired), tokenizer, cfg.max_length, dropped,
                              cfg.seed)
        objective = kto.KTOObjective(cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    if not pairs:
        raise ValueError(f"{pairs_path}: no preference pair left to train on (dropped: {dict(dropped)})")
    n_pairs = len(pairs)
    if sft_data:
        pairs += nll_rows(sft_data)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora is not None and Path(reference_path).resolve() != Path(policy_path).resolve():
        raise ValueError("with LoRA the reference is the starting model with its adapters off: "
                         f"policy {policy_path} and reference {reference_path} must be the same")
    model = adapters.load_trainable(policy_path, cfg.lora, cfg.seed)
    ref_key = None  # a reference-free loss (SimPO, ORPO): no reference pass, the pairs' reference log-probs stay 0
    if cfg.loss.needs_reference:
        ref_key = reference_logps(reference_path, pairs, pairs_path, cfg, out / "reference_logps.json",
                                  tokenizer.pad_token_id, adapted=model if cfg.lora is not None else None)
    model.train()
    collate_fn = collate_packed_pairs if cfg.packed else lambda chunk: collate_pairs(chunk, tokenizer.pad_token_id)
    if not cfg.loss.needs_pairs:
        collate_fn = kto.labelled(collate_fn)
    with packed_attention(model, cfg.packed):
        summary = train(model, pairs, collate_fn, cfg, out, objective=objective, desc="dpo",
                        export=adapters.exporter(policy_path, cfg.lora, out, tokenizer))
    labels = {} if cfg.loss.needs_pairs else {"desirable_rows": sum(p.desirable for p in pairs)}
    if sft_data:
        labels["sft_rows"] = len(pairs) - n_pairs
    return {**summary, "rows": {"kept": n_pairs, "dropped": dict(dropped)}, **labels,
            "reference": str(reference_path), "reference_logps_key": ref_key}


def chosen_dialogues(pairs_path: Path, out: Path) -> Path:
    """The training pairs' chosen answers as dialogue rows (prompt + chosen), for SFT on them."""
    from dalign.data import write_rows

    rows = read_rows(pairs_path, validate=validate_preference)
    path = out / "chosen_dialogues.jsonl"
    write_rows(path, [{"id": str(r.get("prompt_id", i)), "messages": r["prompt"] + r["chosen"]} for i, r in enumerate(rows)])
    return path


def stage(recipe, out: Path, inputs: dict[str, Path], variant_name: str) -> dict:
    """A `dpo-<variant>` stage: dDPO on the training pairs from the variant's start ('sft', or the
    recipe's starting model), which is also the frozen reference; or, for a variant of method sft
    (the paper's dSFT-2), SFT from that start on the pairs' chosen answers."""
    from dalign import decontaminate, roles
    from dalign.models import resolve
    from dalign.sft import replay_and_tokenizer, run_sft

    variant = next(v for v in recipe.variants if v.name == variant_name)
    models = roles.models(recipe, inputs)
    start, reference = (Path(resolve(models["sft" if name == "sft" else "start"]))
                        for name in (variant.start, variant.reference or variant.start))
    cfg = recipe.dpo_for(variant)
    # KTO on unpaired rows: every rated completion, or rows read as unpaired (recipe.check_variant).
    rows_from = "ratings" if variant.rows == "ratings" else "source" if recipe.pairs.source_rows == "unpaired" else None
    if rows_from is not None:
        unpaired = (rated_file(recipe, variant, inputs["ratings"], out) if rows_from == "ratings"
                    else inputs["pairs"] / "train.jsonl")
        rows, checked = decontaminate.decontaminated_file(recipe, unpaired, decontaminate.unpaired_texts, out)
        return {"seeds": {"data_order": cfg.seed}, "start": variant.start, "rows_from": rows_from,
                **run_dpo(cfg, start, reference, rows, out), "decontamination": checked}
    pairs, checked = decontaminate.decontaminated_file(recipe, inputs["pairs"] / "train.jsonl",
                                                       decontaminate.preference_texts, out)
    if variant.method == "sft":
        sft = recipe.sft.model_copy(update={"epochs": cfg.epochs, "seed": cfg.seed,
                                            "learning_rate": variant.learning_rate or recipe.sft.learning_rate})
        out.mkdir(parents=True, exist_ok=True)
        replay, tokenizer = replay_and_tokenizer(recipe, inputs, inputs["base"] if recipe.world_start else None)
        facts = run_sft(sft, start, chosen_dialogues(pairs, out), out, replay, tokenizer)
        return {"seeds": {"data_order": sft.seed}, "start": variant.start, "method": "sft", "reference": str(start), **facts,
                "decontamination": checked}
    if not cfg.loss.needs_pairs:  # KTO on the pairs: each side its own row
        pairs = unpaired_file(pairs, out)
    sft_data, sft_facts = (sft_rows(recipe, inputs, start, cfg.max_length, out) if variant.sft_data else (None, {}))
    return {"seeds": {"data_order": cfg.seed}, "start": variant.start,
            **run_dpo(cfg, start, reference, pairs, out, sft_data), **sft_facts, "decontamination": checked}


def sft_rows(recipe, inputs: dict[str, Path], start: Path, max_length: int, out: Path) -> tuple[list[Example], dict]:
    """The dSFT stage's data (its dialogues, decontaminated as it does, and its replay of pretraining
    text on the world) as sequences for ORPO, and what was read and dropped."""
    from dalign import decontaminate
    from dalign.sft import replay_and_tokenizer, sft_examples

    replay, tokenizer = replay_and_tokenizer(recipe, inputs, inputs["base"] if recipe.world_start else None)
    dialogues, checked = decontaminate.decontaminated_file(recipe, inputs["dialogues"] / "dialogues.jsonl",
                                                           decontaminate.dialogue_texts, out / "sft_data")
    examples, n_replay, dropped, _ = sft_examples(recipe.sft, dialogues, tokenizer or AutoTokenizer.from_pretrained(start),
                                                  replay, max_length)
    return examples, {"sft_data": {"dialogues": len(examples) - n_replay, "replay": n_replay, "dropped": dict(dropped),
                                   "decontamination": checked}}


def unpaired_file(pairs_path: Path, out: Path) -> Path:
    """The pairs as unpaired rows (dalign.binarize.unpair), written by rank 0 for every process."""
    from dalign.binarize import unpair

    return _written(out / "unpaired.jsonl", lambda: unpair(read_rows(pairs_path, validate=validate_preference)))


def rated_file(recipe, variant, ratings: Path, out: Path) -> Path:
    """Every rated completion of the training prompts as an unpaired row, labelled by the variant's
    desirable_score (dalign.binarize.unpaired_training_rows), written by rank 0 for every process."""
    from dalign.binarize import unpaired_training_rows

    return _written(out / "unpaired.jsonl", lambda: unpaired_training_rows(
        read_rows(ratings / "ratings.jsonl"), variant.desirable_score, recipe.pairs))


def _written(path: Path, rows) -> Path:
    from dalign.data import write_rows
    from dalign.parallel import barrier, is_main

    if is_main():
        write_rows(path, rows())
    barrier()
    return path
