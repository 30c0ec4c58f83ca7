"""The packed path (prompt shared by chosen and rejected, no padding, logits only where an
answer token is predicted) gives the padded path's log-probs and gradients on the same pairs."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from dalign.dpo import collate_pairs, make_pairs, sequence_logps
from dalign.packed import collate_packed_pairs, use_packed_attention
from dalign.pretrain import build_model
from test_dpo import TINY, setup, world_pairs  # noqa: F401  (setup is a fixture)


@pytest.fixture
def pairs_and_models(world_tokenizer, one_thread):
    pairs = make_pairs(world_pairs(6), world_tokenizer, 256, Counter())
    plain = build_model(TINY, world_tokenizer, seed=0)
    with torch.no_grad():  # wider weights than the init, so that log-probs differ a lot between tokens
        for p in plain.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    packed = copy.deepcopy(plain)
    use_packed_attention(packed)
    return pairs, plain, packed, world_tokenizer.pad_token_id


def test_packed_pairs_hold_each_prompt_once(pairs_and_models):
    pairs, _, _, _ = pairs_and_models
    batch = collate_packed_pairs(pairs)
    padded = collate_pairs(pairs, 0)
    prompts = sum(p.chosen.labels.index(next(t for t in p.chosen.labels if t != -100)) for p in pairs)
    assert batch["input_ids"].shape[1] == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs) - prompts
    assert batch["input_ids"].shape[1] < padded["input_ids"].numel()
    assert len(batch["targets"]) == int((padded["labels"][:, 1:] != -100).sum())


def test_packed_log_probs_and_gradients_equal_the_padded_ones(pairs_and_models):
    pairs, plain, packed, pad = pairs_and_models
    want = sequence_logps(plain, collate_pairs(pairs, pad))
    got = sequence_logps(packed, collate_packed_pairs(pairs))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    # Gradients of the same scalar of the log-probs agree parameter by parameter.
    weights = torch.linspace(-1, 1, len(want))
    (weights * want).sum().backward()
    (weights * got).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_pairs_with_different_prompts_are_refused(pairs_and_models):
    pairs, *_ = pairs_and_models
    broken = copy.deepcopy(pairs[0])
    broken.rejected.input_ids[0] += 1
    with pytest.raises(ValueError, match="same prompt"):
        collate_packed_pairs([broken])


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8, "dropout": 0.0}])
def test_dpo_trains_the_same_packed_or_padded(setup, lora, tmp_path):
    import json

    from dalign.config import DPOConfig
    from dalign.dpo import run_dpo

    logs = {}
    for packed in (False, True):
        cfg = DPOConfig(max_steps=4, learning_rate=2e-2, beta=0.5, per_device_batch_size=8, log_every=1, packed=packed,
                        lora=lora)
        out = tmp_path / f"packed-{packed}"
        run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", out)
        logs[packed] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # The saved model is back on the usual attention: it loads and runs anywhere.
        assert json.loads((out / "model" / "config.json").read_text()).get("attn_implementation") in (None, "sdpa")
    for a, b in zip(logs[False], logs[True]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-4)


def test_packed_sft_loss_and_gradients_equal_the_padded_ones(pairs_and_models):
    from dalign.packed import collate_packed
    from dalign.train import collate, pack, token_loss_sum

    pairs, plain, packed, pad = pairs_and_models
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    want, n_want = token_loss_sum(plain, collate([[e] for e in examples], pad))  # one padded row each
    got, n_got = token_loss_sum(packed, collate_packed(pack(examples, 200)))  # several per bin, one row in all
    assert n_got == n_want and torch.allclose(got, want, rtol=1e-5), (got, want)
    want.backward()
    got.backward()
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def gqa_models(tokenizer, pad: int):
    """A model whose key/value heads are each shared by two query heads (as SmolLM2's and
    Mistral's are), and a copy of it on the packed attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         max_position_embeddings=512, pad_token_id=pad))
    packed = copy.deepcopy(plain)
    use_packed_attention(packed)
    return plain, packed


def test_grouped_query_attention_packs_the_same(pairs_and_models, world_tokenizer):
    pairs, _, _, pad = pairs_and_models
    plain, packed = gqa_models(world_tokenizer, pad)
    want = sequence_logps(plain, collate_pairs(pairs, pad))
    got = sequence_logps(packed, collate_packed_pairs(pairs))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()


def test_the_flex_attention_kernel_gives_the_padded_log_probs(pairs_and_models, world_tokenizer):
    """The GPU kernel (one FlexAttention call per layer, block mask from the spans), run here on
    the CPU, forward only: FlexAttention has no backward on a CPU; bench/gpu_check.sh checks the
    gradients on a GPU. Grouped-query attention and the shared prompt of a pair included."""
    from dalign.packed import collate_packed, packed_logits, packed_token_logps
    from dalign.train import collate, pack, token_loss_sum

    pairs, _, _, pad = pairs_and_models
    plain, packed = gqa_models(world_tokenizer, pad)
    with torch.no_grad():
        want = sequence_logps(plain, collate_pairs(pairs, pad))
        batch = collate_packed_pairs(pairs)
        logps, sequence = packed_token_logps(packed, batch, flex=True)
        got = torch.zeros(len(want)).index_add(0, sequence, logps)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
        # Without the block mask the same row gives other numbers: the mask is what keeps the
        # rejected answer from seeing the chosen one.
        spans = batch["dalign_spans"]
        assert not torch.allclose(packed_logits(packed, {**batch, "dalign_spans": [
            type(s)(s.start, s.start, s.end, s.end) for s in spans]}, flex=True), packed_logits(packed, batch, flex=True))
        examples = [p.chosen for p in pairs]
        sft_want, n = token_loss_sum(plain, collate([[e] for e in examples], pad))
        rows = collate_packed(pack(examples, 400))
        sft_got = torch.nn.functional.cross_entropy(packed_logits(packed, rows, flex=True), rows["targets"],
                                                    reduction="sum")
        assert n == len(rows["targets"]) and torch.allclose(sft_got, sft_want, rtol=1e-5), (sft_got, sft_want)
