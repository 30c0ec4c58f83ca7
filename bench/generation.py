"""Generation: dalign's local backend (batched, left-padded, KV cache) against plain
one-prompt-at-a-time `generate` on the same prompts, greedy, same model."""

from __future__ import annotations

import time

import torch

from bench import common
from dalign.backends import Sampling
from dalign.chat import prompt_ids
from dalign.generation import LocalModel

TEMPLATE = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"


def compare(size: str, n_prompts: int, batch: int, new_tokens: int) -> dict:
    tok = common.tokenizer()
    tok.chat_template = TEMPLATE
    model = common.model(size, 512).eval()
    convs = [[{"role": "user", "content": common.text(r.prompt)}] for r in common.rows(n_prompts, 512)]
    with torch.no_grad():
        model.generation_config.eos_token_id = None  # every reply runs its full length on both sides
        start = time.perf_counter()
        single = []
        for conv in convs:
            ids = torch.tensor([prompt_ids(tok, conv)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=common.PAD)
            single.append(out[0, ids.shape[1]:].tolist())
        single_s = time.perf_counter() - start
        local = LocalModel(model, tok, batch_size=batch)
        start = time.perf_counter()
        local.generate(convs, Sampling(0.0, new_tokens))
        batched_s = time.perf_counter() - start
    tokens = sum(len(s) for s in single)
    return {"prompts": n_prompts, "batch": batch, "new_tokens": new_tokens,
            "one_at_a_time_tokens_per_s": tokens / single_s, "local_backend_tokens_per_s": local.generated_tokens / batched_s,
            "ratio": (local.generated_tokens / batched_s) / (tokens / single_s)}
