"""Local generation on transformers: a Backend over a causal LM and its chat template.

Batched with left padding and the KV cache, stopping each row at the end-of-sequence
token. Rows are sorted by prompt length inside a call so that batches carry little
padding, and the replies come back in the caller's order.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from dalign.backends import Conversation, Sampling, Samplings, cut_at_stop, per_row
from dalign.chat import prompt_ids


class LocalModel:
    def __init__(self, model, tokenizer, batch_size: int = 64, name: str | None = None):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.name = name or str(getattr(model.config, "_name_or_path", "local-model"))
        self.generated_tokens, self.seconds = 0, 0.0  # throughput for the manifest

    @classmethod
    def load(cls, spec: str | Path, batch_size: int = 64, name: str | None = None,
             chat_template: str | None = None) -> "LocalModel":
        """A model folder, hub id or built-in name (dalign.models), with the recipe's chat template if
        given; on this process's GPU when there is one (GPU `LOCAL_RANK` under a launch)."""
        import os

        from dalign.models import load_model, load_tokenizer

        model = load_model(spec)
        if torch.cuda.is_available():
            model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        return cls(model, load_tokenizer(spec, chat_template), batch_size, name or str(spec))

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str]:
        """Rows that share sampling settings are batched together (one `generate` call cannot mix
        them). Seeds are the exception: a batch draws from one generator, seeded by its first
        row's seed, so per-row seeds do not split batches (a server, by contrast, honours each)."""
        started = time.perf_counter()
        prompts = [prompt_ids(self.tokenizer, c) for c in conversations]
        settings = per_row(sampling, len(prompts))
        replies: list[str] = [""] * len(prompts)
        groups = {}  # settings but the seed -> rows, in first-seen order
        for i, s in enumerate(settings):
            groups.setdefault(replace(s, seed=0), []).append(i)
        for rows in groups.values():
            setting = settings[rows[0]]
            order = sorted(rows, key=lambda i: len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                torch.manual_seed(setting.seed + start)  # reproducible samples whatever ran before
                for i, text in zip(chunk, self._batch([prompts[i] for i in chunk], setting)):
                    replies[i] = cut_at_stop(text, setting.stop)
        self.seconds += time.perf_counter() - started
        return replies

    def throughput(self) -> dict:
        """Generated tokens and tokens per second over every call so far."""
        return {"generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.generated_tokens / self.seconds, 1) if self.seconds else None}

    def _batch(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        sample = sampling.temperature > 0
        # Stop strings end a row's generation early (transformers checks them on the decoded text).
        stops = {"stop_strings": list(sampling.stop), "tokenizer": tok} if sampling.stop else {}
        device = self.model.device
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                                  temperature=sampling.temperature if sample else None, top_p=None, top_k=None,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **stops)
        texts = []
        for row in out[:, width:].cpu().tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            self.generated_tokens += len(row)
            texts.append(tok.decode(row, skip_special_tokens=False).replace(tok.pad_token, "").strip())
        return texts
