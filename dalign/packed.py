"""Padding-free training batches: several sequences in one row, attention kept within each,
computed span by span, so that no token is padding and no work crosses a sequence border.

A DPO pair is packed with its prompt once (prefix sharing): [prompt, chosen, rejected], the
rejected answer's positions continuing from the prompt and its queries attending the prompt
and itself only. Logits are computed only where a completion token is predicted (the head
and the log-softmax over the vocabulary skip the prompt), through transformers'
`logits_to_keep`.

The attention is registered with transformers as "dalign_packed" (and a mask function that
builds no mask): it reads the spans from the forward call's `dalign_spans` keyword, which
transformers passes down to every attention layer. Two kernels compute it:
- on a CPU, one scaled_dot_product_attention call per span (no work across spans; FlexAttention
  has no backward on a CPU);
- on a GPU, one FlexAttention call per layer for the whole row, with a block mask built once per
  forward from the spans (each span causal and to itself; a rejected answer sees the prompt and
  itself, not the chosen answer). A Python loop of small kernels per span would leave a GPU idle,
  and flash-attention's variable-length kernel cannot express the shared prompt without copying
  it next to each answer. The row is padded to a multiple of the mask's block size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalign.chat import IGNORE

ATTENTION = "dalign_packed"


@dataclass(frozen=True)
class Span:
    """One packed sequence: [start, shared) is attended by everything after it in the span;
    [shared, first_end) is the first continuation, [first_end, end) an optional second one
    that attends [start, shared) and itself only (the rejected answer beside the chosen)."""

    start: int
    shared: int
    first_end: int
    end: int


BLOCK = 128  # FlexAttention's block size: padded rows are a multiple of it


def span_block_mask(spans: list[Span], length: int, device):
    """The FlexAttention block mask of a packed row of `length` tokens (padding past the last span
    is a sequence of its own, whose outputs nothing reads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    sequence = torch.full((length,), len(spans), dtype=torch.int32, device=device)
    second = torch.zeros(length, dtype=torch.bool, device=device)  # the rejected answer of a pair
    first = torch.zeros(length, dtype=torch.bool, device=device)  # the chosen answer of a pair with a second
    for i, s in enumerate(spans):
        sequence[s.start:s.end] = i
        if s.end > s.first_end:
            first[s.shared:s.first_end] = True
            second[s.first_end:s.end] = True

    def mask_mod(b, h, q, kv):
        return (sequence[q] == sequence[kv]) & (kv <= q) & ~(second[q] & first[kv])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


_flex = None


def _flex_attention(query, key, value, block_mask, scale):
    global _flex
    if _flex is None:  # compiled once per process: uncompiled, FlexAttention materialises the whole score matrix
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention)  # a second length recompiles once, for any length
    return _flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


def use_flex(device: torch.device) -> bool:
    """Which kernel runs the span attention: FlexAttention on a GPU, the per-span loop elsewhere."""
    return device.type == "cuda"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               dalign_spans: list[Span] | None = None, dalign_block_mask=None, **kwargs):
    """query (1, H, T, D), key and value (1, Hkv, T, D) -> (1, T, H, D), causal within each span."""
    if dalign_spans is None:
        raise ValueError("a model set to dalign's packed attention must be called with dalign_spans")
    if dalign_block_mask is not None:
        return _flex_attention(query, key, value, dalign_block_mask, scaling).transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.empty_like(query)
    for s in dalign_spans:
        q, k, v = query[:, :, s.start:s.first_end], key[:, :, s.start:s.first_end], value[:, :, s.start:s.first_end]
        out[:, :, s.start:s.first_end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        if s.end > s.first_end:  # the second continuation: the shared part, then itself causally
            n_shared, n = s.shared - s.start, s.end - s.first_end
            k2 = torch.cat([key[:, :, s.start:s.shared], key[:, :, s.first_end:s.end]], dim=2)
            v2 = torch.cat([value[:, :, s.start:s.shared], value[:, :, s.first_end:s.end]], dim=2)
            allowed = torch.ones(n, n_shared + n, dtype=torch.bool, device=query.device)
            allowed[:, n_shared:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            out[:, :, s.first_end:s.end] = F.scaled_dot_product_attention(
                query[:, :, s.first_end:s.end], k2, v2, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the spans say who attends whom


def use_packed_attention(model) -> None:
    """Switch a transformers model to the span attention (reversible with set_attn_implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
    model.set_attn_implementation(ATTENTION)


def collate_packed(rows) -> dict:
    """Every example of a micro-batch (rows of dalign.train Examples, as `pack` makes them) in
    one row, each attending only itself, position ids restarting; `predict_at` and `targets`
    hold where a labelled token is predicted and which, for dalign.train.token_loss_sum."""
    ids, pos, spans, at, targets = [], [], [], [], []
    for row in rows:
        for ex in row:
            start, n = len(ids), len(ex.input_ids)
            ids += ex.input_ids
            pos += range(n)
            spans.append(Span(start, start, start + n, start + n))
            # An example's first token is never predicted (nothing before it in its own sequence).
            for k in range(1, n):
                if ex.labels[k] != IGNORE:
                    at.append(start + k - 1)
                    targets.append(ex.labels[k])
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "dalign_spans": spans,
            "predict_at": torch.tensor(at, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long)}


def collate_packed_pairs(pairs) -> dict:
    """dalign.dpo Pairs in one row of [prompt, chosen, rejected] spans. The scored sequences
    are the chosen answers (0..n-1), then the rejected (n..2n-1), as `collate_pairs` orders them:
    `predict_at` holds the row positions whose logits predict an answer token, `targets` those
    tokens and `sequence` which scored sequence each belongs to."""
    ids, pos, spans, at, targets, seq = [], [], [], [], [], []
    n = len(pairs)
    for i, pair in enumerate(pairs):
        prompt_len = next(k for k, t in enumerate(pair.chosen.labels) if t != IGNORE)
        prompt = pair.chosen.input_ids[:prompt_len]
        if pair.rejected.input_ids[:prompt_len] != prompt or pair.rejected.labels[prompt_len - 1] != IGNORE:
            raise ValueError("a pair's chosen and rejected do not start with the same prompt")
        chosen, rejected = pair.chosen.input_ids[prompt_len:], pair.rejected.input_ids[prompt_len:]
        start = len(ids)
        ids += prompt + chosen + rejected
        pos += list(range(prompt_len + len(chosen))) + list(range(prompt_len, prompt_len + len(rejected)))
        shared, first_end = start + prompt_len, start + prompt_len + len(chosen)
        spans.append(Span(start, shared, first_end, len(ids)))
        # Token k of an answer is predicted from the token before it: the prompt's last, then its own.
        for answer, labels, begin, index in ((chosen, pair.chosen.labels, shared, i),
                                             (rejected, pair.rejected.labels, first_end, n + i)):
            for k, token in enumerate(answer):
                if labels[prompt_len + k] != IGNORE:
                    at.append(shared - 1 if k == 0 else begin + k - 1)
                    targets.append(token)
                    seq.append(index)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "dalign_spans": spans,
            "predict_at": torch.tensor(at), "targets": torch.tensor(targets), "sequence": torch.tensor(seq),
            "ref_chosen": torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64),
            "ref_rejected": torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64),
            "nll_only": torch.tensor([p.nll_only for p in pairs])}


def packed_logits(model, batch: dict, flex: bool | None = None) -> torch.Tensor:
    """Logits (N, V) at the packed batch's `predict_at` positions only: the head and the softmax
    over the vocabulary skip every position whose next token carries no loss. `flex`: the
    FlexAttention kernel (default: on a GPU)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask = None
    if use_flex(ids.device) if flex is None else flex:
        pad = -ids.shape[1] % BLOCK
        ids, pos = F.pad(ids, (0, pad)), F.pad(pos, (0, pad))
        mask = span_block_mask(batch["dalign_spans"], ids.shape[1], ids.device)
    return model(input_ids=ids, position_ids=pos, dalign_spans=batch["dalign_spans"], dalign_block_mask=mask,
                 logits_to_keep=batch["predict_at"], use_cache=False).logits[0].float()


def packed_token_logps(model, batch: dict, flex: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) at every scored answer token of a packed batch, and its sequence index."""
    logits = packed_logits(model, batch, flex)
    return torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1), batch["sequence"]


@contextlib.contextmanager
def packed_attention(model, enabled: bool = True):
    """The model with the span attention inside the block, its own attention again after (so
    that a saved model loads anywhere); with `enabled` false, the model as it is."""
    if not enabled:
        yield model
        return
    before = model.config._attn_implementation
    use_packed_attention(model)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
