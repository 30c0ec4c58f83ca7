"""What every benchmark shares: synthetic rows, the two model sizes, a word-level tokenizer
both trainers read the same way, a peak-memory meter, and FLOP counting.

The rows are token sequences with prompts of 20-200 tokens and answers of 20-300 at length
512 (both scaled with the length), over an 8192-word vocabulary. The tokenizer maps each
space-separated word to one id, so TRL, which tokenizes text itself, sees exactly the ids
dalign is handed directly.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import threading
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 8192
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
EOS, PAD = 2, 3

# Llama shapes of about 7.4M and 34M parameters at an 8192-token vocabulary (untied head), and
# SmolLM2-135M's own (grouped-query attention, 49152-token vocabulary, tied head) for the GPU check.
SIZES = {"7M": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
         "34M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
         "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)}
GPU = torch.cuda.is_available()  # benchmarks on a GPU train in bf16, as GPU recipes do
DEVICE = torch.device("cuda" if GPU else "cpu")


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def peer_gpu_options() -> tuple[str, bool]:
    """TRL's fastest GPU settings that this machine has: flash-attention 2 (its padding-free path
    needs it) and Liger's fused kernels, where installed; else sdpa and no Liger."""
    if not GPU:
        return "sdpa", False
    return ("flash_attention_2" if installed("flash_attn") else "sdpa"), installed("liger_kernel")


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def model(size: str, max_length: int, seed: int = 0, attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    shape = {"vocab_size": VOCAB, "tie_word_embeddings": False, **SIZES[size]}
    config = LlamaConfig(max_position_embeddings=max(2048, max_length), bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=PAD, attn_implementation=attention, **shape)
    return LlamaForCausalLM(config).float()


@dataclass
class Row:
    prompt: list[int]
    chosen: list[int]  # ends with EOS
    rejected: list[int]  # ends with EOS


def rows(n: int, max_length: int, seed: int = 0) -> list[Row]:
    """n preference rows; SFT uses prompt + chosen. Lengths scale with max_length / 512, so
    that every row fits (a prompt of 200 and an answer of 300 make 500 at 512)."""
    rng, scale = random.Random(seed), max_length / 512

    def words(lo: int, hi: int) -> list[int]:
        return [rng.randrange(len(SPECIALS), VOCAB) for _ in range(rng.randint(int(lo * scale), int(hi * scale)))]

    return [Row(words(20, 200), words(20, 300) + [EOS], words(20, 300) + [EOS]) for _ in range(n)]


def text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"w{i}" for i in ids)


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread; freed
    memory is handed back to the system first (malloc_trim) so one trainer's leftovers do not
    hide the next one's peak. On a GPU, the peak of GPU memory allocated above the entry level."""

    def __enter__(self):
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if GPU:
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward_flops(m: LlamaForCausalLM, tokens: int, predicted: int, context_before: int = 0) -> float:
    """Model FLOPs of one forward pass over `tokens` tokens that follow `context_before` tokens
    already encoded, with the output head applied where one of `predicted` labelled tokens is
    predicted (the loss needs no logits elsewhere): 2 per weight per token in the matmuls (the
    embedding lookup is no matmul), plus attention scores and values, 2 x 2 x layers x hidden
    per (query, key) pair under the causal mask. A backward pass costs twice this."""
    c, head = m.config, m.lm_head.weight.numel()
    body = sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n and p.dim() == 2) - head
    pairs = tokens * context_before + tokens * (tokens + 1) / 2
    return 2 * body * tokens + 2 * head * predicted + 4 * c.num_hidden_layers * c.hidden_size * pairs


def sft_flops(m: LlamaForCausalLM, rows: list[Row]) -> float:
    """An SFT epoch: forward and backward over every prompt + answer, loss on the answer."""
    return sum(3 * forward_flops(m, len(r.prompt) + len(r.chosen), len(r.chosen)) for r in rows)


def dpo_flops(m: LlamaForCausalLM, rows: list[Row]) -> float:
    """A DPO epoch counted as the least work that gives the loss: each prompt encoded once, each
    answer attending the prompt, logits on answer tokens; forward and backward for the policy,
    one forward for the reference. Every trainer is credited with this, so extra work (a prompt
    encoded twice, logits nobody reads) lowers its utilisation instead of raising it."""
    def forward(r: Row) -> float:
        return (forward_flops(m, len(r.prompt) + len(r.chosen), len(r.chosen))
                + forward_flops(m, len(r.rejected), len(r.rejected), context_before=len(r.prompt)))

    return sum(4 * forward(r) for r in rows)


def matmul_peak(seconds: float = 3.0) -> float:
    """fp32 matmul FLOP/s of this machine on all its threads: the best of repeated square
    products of 1024 and 2048 (the larger is needed to reach the peak on some machines)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best
