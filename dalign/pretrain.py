"""Stage 0: the world's base model, trained from scratch on plain world text.

It plays Mistral-7B's role in the paper: it knows the world's language and facts and has
never seen the chat format. Saved in Hugging Face format with its tokenizer and the chat
template, so `AutoModelForCausalLM.from_pretrained` loads it like any other model.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dalign.adapters import exporter
from dalign.chat import ZEPHYR_TEMPLATE
from dalign.config import BaseConfig
from dalign.parallel import barrier, is_main
from dalign.train import Example, collate, train
from dalign.world.corpus import documents
from dalign.world.tokenizer import train_tokenizer


def build_model(shape, tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                         intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_position,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def corpus_tokens(cfg: BaseConfig, tokenizer, cache: Path) -> np.ndarray:
    """The corpus as one token stream, documents separated by eos; cached for resumes."""
    if cache.exists():
        return np.load(cache)
    docs = list(itertools.islice(documents(cfg.seed), cfg.corpus_documents))
    ids: list[int] = []
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:  # one batched call: tokenizers runs it in Rust
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_token_id)
    array = np.asarray(ids, dtype=np.int32)
    np.save(cache.with_suffix(".tmp.npy"), array)
    cache.with_suffix(".tmp.npy").replace(cache)
    return array


def blocks(tokens: np.ndarray, length: int) -> list[Example]:
    n = len(tokens) // length
    return [Example(input_ids=tokens[i * length:(i + 1) * length].tolist(),
                    labels=tokens[i * length:(i + 1) * length].tolist()) for i in range(n)]


def run_pretrain(cfg: BaseConfig, out: Path) -> dict:
    tok_dir = out / "tokenizer"
    if is_main():  # the tokenizer and the token stream are made once, then read by every process
        if not (tok_dir / "tokenizer.json").exists():
            sample = itertools.islice(documents(cfg.seed + 1), 20000)
            train_tokenizer(sample, cfg.model.vocab_size, cfg.chat_template or ZEPHYR_TEMPLATE).save_pretrained(tok_dir)
        corpus_tokens(cfg, PreTrainedTokenizerFast.from_pretrained(tok_dir), out / "corpus_tokens.npy")
    barrier()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tokens = corpus_tokens(cfg, tokenizer, out / "corpus_tokens.npy")
    rows = blocks(tokens, cfg.max_length)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    parameters = sum(p.numel() for p in model.parameters())  # counted before an engine shards them
    summary = train(model, rows, lambda r: collate([[e] for e in r], tokenizer.pad_token_id), cfg, out, desc="base",
                    export=exporter(None, None, out, tokenizer))
    return {**summary, "corpus_tokens": int(len(tokens)), "vocab_size": len(tokenizer), "parameters": parameters}


def stage(recipe, out: Path, inputs: dict, student: str | None = None) -> dict:
    """The `base` stage of a recipe that starts from the world, or a student's `base-<name>`: the
    same settings and corpus, the student's shape."""
    cfg = recipe.base
    if student is not None:
        cfg = cfg.model_copy(update={"model": next(s for s in recipe.students if s.name == student).model})
    return {"seeds": {"weights_and_data": cfg.seed}, **run_pretrain(cfg, out)}
