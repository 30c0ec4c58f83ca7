"""The benchmark's FLOP count, against the FLOPs torch counts while the model runs."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from bench import common


def test_forward_flops_match_torch_count():
    torch.manual_seed(0)
    # Eager attention: plain matmuls, which torch counts (its CPU sdpa kernel has no FLOP formula).
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    model, n = LlamaForCausalLM(config).eval(), 24
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 512, (1, n)))
    # torch counts the full n x n score and value products; the causal mask leaves n(n+1)/2 pairs,
    # and a mask-aware kernel does only those.
    attention_square = 4 * config.num_hidden_layers * config.hidden_size * n * n
    attention_causal = 4 * config.num_hidden_layers * config.hidden_size * n * (n + 1) / 2
    assert counter.get_total_flops() - attention_square == common.forward_flops(model, n, predicted=n) - attention_causal
    # Logits only where an answer token is predicted: the head's matmul on those positions alone.
    head = 2 * model.lm_head.weight.numel()
    assert common.forward_flops(model, n, n) - common.forward_flops(model, n, 10) == head * (n - 10)
