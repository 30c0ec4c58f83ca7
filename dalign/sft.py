"""Stage 1b: distilled supervised fine-tuning on the teacher's dialogues.

Loss on assistant turns only, through the chat template. A share of the sequences replays
pretraining text (all tokens labelled) so that the base model's knowledge survives SFT.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from dalign import adapters
from dalign.chat import tokenize_dialogue
from dalign.config import SFTConfig
from dalign.data import ReadReport, read_rows, validate_dialogue
from dalign.models import resolve
from dalign.packed import collate_packed, packed_attention
from dalign.train import Example, collate, pack, train


def dialogue_examples(rows: list[dict], tokenizer, max_length: int, dropped: Counter) -> list[Example]:
    examples = []
    for row in rows:
        tokenized = tokenize_dialogue(tokenizer, row["messages"])
        if len(tokenized.input_ids) > max_length:
            dropped["too_long"] += 1  # truncating would cut an answer and teach the model to stop mid-way
            continue
        examples.append(Example(tokenized.input_ids, tokenized.labels))
    return examples


def replay_examples(tokens: np.ndarray, count: int, length: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - length) for _ in range(count)]
    return [Example(tokens[s:s + length].tolist(), tokens[s:s + length].tolist()) for s in starts]


def sft_examples(cfg: SFTConfig, dialogues: Path, tokenizer, replay_tokens: np.ndarray | None, max_length: int
                 ) -> tuple[list[Example], int, Counter, ReadReport]:
    """The dSFT data as training sequences: the dialogues (longer than max_length: dropped, counted),
    then cfg.replay_ratio of the total as pretraining text when there is a corpus to replay; also
    the replayed count, the drops by reason and the read report."""
    report = ReadReport(str(dialogues))
    rows = read_rows(dialogues, validate=validate_dialogue, skip_bad=cfg.skip_bad_rows, report=report)
    dropped = Counter(report.dropped)
    examples = dialogue_examples(rows, tokenizer, max_length, dropped)
    if not examples:
        raise ValueError(f"{dialogues}: no dialogue left to train on (dropped: {dict(dropped)})")
    n_replay = 0
    if replay_tokens is not None and cfg.replay_ratio > 0:
        n_replay = round(len(examples) * cfg.replay_ratio / (1 - cfg.replay_ratio))
        mean_len = int(np.mean([len(e.input_ids) for e in examples]))
        examples += replay_examples(replay_tokens, n_replay, mean_len, cfg.seed)
    return examples, n_replay, dropped, report


def run_sft(cfg: SFTConfig, model_path: Path, dialogues: Path, out: Path, replay_tokens: np.ndarray | None,
            tokenizer=None) -> dict:
    """`tokenizer`: given when the model folder's own lacks the chat template (a base model
    without one, given the recipe's start.chat_template)."""
    adapters.check(cfg.lora, "sft")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    examples, n_replay, dropped, report = sft_examples(cfg, dialogues, tokenizer, replay_tokens, cfg.max_length)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)  # packing mixes dialogues and replay in every row
    ordered = [examples[i] for i in order]
    rows_to_train = pack(ordered, cfg.max_length) if cfg.packing else [[e] for e in ordered]
    model = adapters.load_trainable(model_path, cfg.lora, cfg.seed)
    # Packed rows go through the span attention: each dialogue attends only itself, with no
    # mask over the whole row and no work across dialogues.
    collate_fn = collate_packed if cfg.packing else partial(collate, pad_id=tokenizer.pad_token_id)
    with packed_attention(model, cfg.packing):
        summary = train(model, rows_to_train, collate_fn, cfg, out, desc="sft",
                        export=adapters.exporter(model_path, cfg.lora, out, tokenizer))
    return {**summary, "rows": {"kept": len(examples) - n_replay, "dropped": dict(dropped), "replay": n_replay},
            "read_errors": report.examples}


def replay_and_tokenizer(recipe, inputs: dict, base: Path | None) -> tuple[np.ndarray | None, object]:
    """What run_sft needs beside the model: the replay tokens of the world base model's corpus (None
    on a model start), and the tokenizer with the recipe's chat template on a model start (None:
    the model folder's own)."""
    from dalign import roles

    replay = np.load(base / "corpus_tokens.npy") if base else None
    return replay, None if recipe.world_start else roles.tokenizer(recipe, inputs)


def stage(recipe, out: Path, inputs: dict, student: str | None = None) -> dict:
    """The `sft` stage: dSFT of the starting model on the dialogues, with pretraining-text replay
    when the start is the world's base model (its corpus is at hand); or a student's `sft-<name>`,
    from its own base model."""
    from dalign import decontaminate, roles

    base = inputs[f"base-{student}" if student else "base"] if recipe.world_start else None
    start = base / "model" if base else roles.models(recipe, inputs)["start"]
    replay, tokenizer = replay_and_tokenizer(recipe, inputs, base)
    dialogues, checked = decontaminate.decontaminated_file(recipe, inputs["dialogues"] / "dialogues.jsonl",
                                                           decontaminate.dialogue_texts, out)
    facts = run_sft(recipe.sft, Path(resolve(start)), dialogues, out, replay, tokenizer)
    return {"seeds": {"data_order": recipe.sft.seed}, "start": str(start), **facts, "decontamination": checked}
