"""`dalign run --dry-run`: the plan for the paper's Zephyr-7B recipe,
worked out offline from the recipe's stated architecture, without loading a weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalign.cli import main
from dalign.config import ConfigError
from dalign.dryrun import GIB, activation_bytes, dry_run, model_on_meta, model_state_bytes
from dalign.parallel import Engine
from dalign.recipe import load_recipe

ZEPHYR = Path(__file__).resolve().parent.parent / "recipes" / "zephyr-7b-beta.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("processes, sft_accumulation, dpo_accumulation", [(8, 8, 4), (16, 4, 2), (32, 2, 1)])
def test_the_zephyr_plan_keeps_the_papers_global_batches(processes, sft_accumulation, dpo_accumulation):
    plan = dry_run(load_recipe(ZEPHYR), processes, Engine.ZERO3)
    assert "7.24B parameters" in plan and f"{processes} processes, engine zero3" in plan
    assert f"global batch 512 = 8 per device x {sft_accumulation} accumulation x {processes} processes" in plan
    assert f"global batch 32 = 1 per device x {dpo_accumulation} accumulation x {processes} processes" in plan
    assert "207865 rows x 1 epochs = 406 steps" in plan  # ceil(207865 / 512), whatever the GPU count
    assert "61135 rows x 3 epochs = 5732 steps" in plan  # ceil(3 * 61135 / 32)
    assert "mixed precision bf16, activation checkpointing on" in plan


def test_the_process_count_comes_from_the_launch_or_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert main(["run", str(ZEPHYR), "--dry-run"]) == 0
    assert "8 processes, engine zero3" in capsys.readouterr().out
    assert main(["run", str(ZEPHYR), "--dry-run", "--processes", "16", "--engine", "fsdp2"]) == 0
    out = capsys.readouterr().out
    assert "16 processes, engine fsdp2" in out and "512 = 8 per device x 4 accumulation x 16 processes" in out


def test_a_global_batch_the_processes_cannot_split_is_refused(capsys):
    assert main(["run", str(ZEPHYR), "--dry-run", "--processes", "12"]) == 2
    err = capsys.readouterr().err
    assert "sft.global_batch_size 512" in err and "8 x 12 processes = 96" in err and "5.33333" in err


def test_the_model_is_built_without_storage():
    model = model_on_meta(load_recipe(ZEPHYR))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_model_state_memory_by_hand():
    params = 1_000_000_000
    bf16 = load_recipe(None, ["sft.mixed_precision=bf16"]).sft
    # DeepSpeed bf16: 2-byte weights and gradients, 12 bytes of fp32 master copy and moments; ZeRO-3 splits all.
    zero3 = model_state_bytes(params, params, bf16, Engine.ZERO3, 4)
    assert zero3 == {"weights": 2 * params / 4, "gradients": 2 * params / 4, "optimizer": 12 * params / 4}
    # ZeRO-2 keeps whole weights on each GPU.
    assert model_state_bytes(params, params, bf16, Engine.ZERO2, 4)["weights"] == 2 * params
    # Autocast under DDP: fp32 weights and gradients, 8 bytes of moments, nothing split: 16 bytes a parameter.
    ddp = model_state_bytes(params, params, bf16, Engine.DDP, 4)
    assert sum(ddp.values()) == 16 * params and ddp["weights"] == 4 * params
    assert model_state_bytes(params, params, bf16, Engine.FSDP2, 4)["weights"] == 4 * params / 4


def test_activation_memory_by_hand():
    class Shape:  # a Mistral-7B block: h 4096, h_kv 1024, i 14336, 32 layers, vocabulary 32000
        hidden_size, intermediate_size, num_hidden_layers = 4096, 14336, 32
        num_attention_heads, num_key_value_heads, vocab_size = 32, 8, 32000

    tokens = 16384  # 8 packed rows of 2048
    per_block = (8 * 4096 + 4 * 1024 + 4 * 14336) * tokens * 2  # bf16 values autograd keeps
    logits = 2 * tokens * 32000 * 4
    sft = load_recipe(None, ["sft.mixed_precision=bf16"]).sft
    assert activation_bytes(Shape, tokens, sft) == 32 * per_block + logits  # about 96 GiB: no GPU holds it
    checkpointed = sft.model_copy(update={"activation_checkpointing": True})
    assert activation_bytes(Shape, tokens, checkpointed) == 32 * 4096 * tokens * 2 + per_block + logits
    assert activation_bytes(Shape, tokens, checkpointed) / GIB < 11


def test_a_recipe_that_starts_from_the_world_is_planned_too():
    plan = dry_run(load_recipe(None, ["dpo.max_steps=7"]), 2, Engine.DDP)
    assert "base model the world's" in plan and "0.00B parameters; 2 processes, engine ddp" in plan
    assert "sft: global batch 16; steps unknown until its data is made (dry_run.sft_rows" in plan
    assert "dpo: global batch 16 = 8 per device x 1 accumulation x 2 processes; 0 rows x 1 epochs = 7 steps" in plan


def test_real_settings_training_ignored_are_gone():
    # The dry run once read real.processes and real.sharding, which training never did.
    for field in ("start.processes=16", "start.sharding=zero3", "start.dtype=bfloat16"):
        with pytest.raises(ConfigError, match=field.split("=")[0]):
            load_recipe(None, ["start.model=x", field])
