"""dDPO with LoRA adapters (PEFT): the reference is the starting model with its adapters off,
only the adapters train, and the saved model is a plain transformers model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dalign.config import DPOConfig, LoraConfig
from dalign.dpo import run_dpo
from test_dpo import margins, setup  # noqa: F401  (setup is a fixture)

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread."""


def test_lora_dpo_trains_only_adapters_against_the_frozen_start(setup, world_tokenizer):
    cfg = DPOConfig(max_steps=12, learning_rate=2e-2, beta=0.5, per_device_batch_size=8, log_every=1,
                    lora=LoraConfig(rank=4, alpha=8, dropout=0.0))
    run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "dpo")
    # The reference log-probs, taken with the adapters off, are the starting model's own.
    stored = json.loads((setup / "dpo" / "reference_logps.json").read_text())["logps"]
    start = margins(setup / "sft", setup / "pairs.jsonl", world_tokenizer)
    assert torch.allclose(torch.tensor([c - r for c, r in stored], dtype=torch.float32), start, atol=1e-4)
    # At step one the adapters add nothing (B starts at zero): the loss is exactly log 2.
    log = [json.loads(line) for line in (setup / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert log[-1]["loss"] < log[0]["loss"]
    # Only adapter weights were saved as the adapter; the merged model loads without PEFT.
    adapter = load_file(setup / "dpo" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    merged = AutoModelForCausalLM.from_pretrained(setup / "dpo" / "model")
    assert type(merged).__name__ == "LlamaForCausalLM"
    after = margins(setup / "dpo" / "model", setup / "pairs.jsonl", world_tokenizer)
    assert (after - start).mean() > 0.5  # the merged adapters moved the margins the right way


def test_lora_with_a_different_reference_is_refused(setup, tmp_path):
    cfg = DPOConfig(max_steps=1, lora=LoraConfig(rank=2))
    with pytest.raises(ValueError, match="adapters off"):
        run_dpo(cfg, setup / "sft", tmp_path / "elsewhere", setup / "pairs.jsonl", setup / "dpo")
