"""Mixed precision and activation checkpointing: bf16 autocast really runs and stays within 1e-3
of fp32 over a few steps; recomputing activations leaves every gradient of a packed dSFT and a
packed dDPO batch unchanged."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dalign.config import DPOConfig, SFTConfig
from dalign.dpo import PreferenceObjective, completion_example, Pair
from dalign.losses import PreferenceLoss
from dalign.packed import collate_packed, collate_packed_pairs, packed_attention
from dalign.sft import dialogue_examples
from dalign.train import TokenObjective, pack, train
from test_dpo import world_pairs
from test_train import tiny_model, world_dialogues


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


@pytest.fixture(scope="module")
def sft_rows(world_tokenizer):
    return pack(dialogue_examples(world_dialogues(24), world_tokenizer, 128, Counter()), 128)


@pytest.fixture(scope="module")
def pairs(world_tokenizer):
    return [Pair(completion_example(world_tokenizer, r["prompt"], r["chosen"]),
                 completion_example(world_tokenizer, r["prompt"], r["rejected"])) for r in world_pairs(8)]


def matmul_dtypes(model) -> tuple[set, list]:
    """The dtypes the first attention projection computes in, recorded on every call."""
    seen: set = set()
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen, [handle]


def test_bf16_autocast_runs_and_stays_within_1e3_of_fp32(world_tokenizer, sft_rows, tmp_path):
    losses = {}
    for precision in ("no", "bf16"):
        model = tiny_model(world_tokenizer)
        seen, handles = matmul_dtypes(model)
        cfg = SFTConfig(mixed_precision=precision, max_steps=4, per_device_batch_size=4, learning_rate=1e-3,
                        log_every=1, checkpoint_every=100, max_length=128)
        with packed_attention(model):
            summary = train(model, sft_rows, collate_packed, cfg, tmp_path / precision, desc="sft")
        for h in handles:
            h.remove()
        assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert summary["mixed_precision"] == precision
        assert next(model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights
        losses[precision] = [json.loads(line)["loss"] for line in (tmp_path / precision / "metrics.jsonl").open()]
    assert len(losses["no"]) == 4
    for fp32, bf16 in zip(losses["no"], losses["bf16"]):
        assert fp32 != bf16 and abs(fp32 - bf16) < 1e-3, (fp32, bf16)


def step_gradients(model, batch, objective, checkpointing: bool) -> tuple[dict, int]:
    """Gradients of one packed batch's loss, and how many times block 0's MLP ran its forward
    (counted on the method: module hooks do not fire again when a checkpoint recomputes)."""
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    mlp, calls = model.model.layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    with packed_attention(model):
        loss, _ = objective.loss(model, batch)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_activation_checkpointing_leaves_the_gradients_unchanged(world_tokenizer, sft_rows, pairs, stage):
    if stage == "sft":
        batch, objective = collate_packed(sft_rows[:4]), TokenObjective()
    else:
        batch, objective = collate_packed_pairs(pairs), PreferenceObjective(0.1, PreferenceLoss.SIGMOID)
        batch["ref_chosen"] -= 1.0  # away from the reference, so the DPO gradient is not the symmetric one
    plain, runs_plain = step_gradients(tiny_model(world_tokenizer), batch, objective, checkpointing=False)
    recomputed, runs_recomputed = step_gradients(tiny_model(world_tokenizer), batch, objective, checkpointing=True)
    assert (runs_plain, runs_recomputed) == (1, 2)  # the block was recomputed in the backward
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_fp16_is_refused_on_a_cpu(world_tokenizer, sft_rows, tmp_path):
    from dalign.parallel import LaunchError

    cfg = DPOConfig(mixed_precision="fp16", max_steps=1)
    if torch.cuda.is_available():
        pytest.skip("fp16 runs where there is a GPU")
    with pytest.raises(LaunchError, match="fp16 needs a GPU"):
        train(tiny_model(world_tokenizer), sft_rows, collate_packed, cfg, tmp_path / "run")


def test_a_bf16_checkpoint_trains_with_fp32_weights(world_tokenizer, tmp_path):
    """transformers loads a bf16 checkpoint (as Mistral-7B ships) in bf16; training must not take
    its AdamW steps on those: the stage loads fp32 weights and autocast does the bf16 products."""
    from dalign.data import write_rows
    from dalign.sft import run_sft
    from safetensors.torch import load_file

    tiny_model(world_tokenizer).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    world_tokenizer.save_pretrained(tmp_path / "base")
    write_rows(tmp_path / "dialogues.jsonl", world_dialogues(8))
    cfg = SFTConfig(mixed_precision="bf16", max_steps=2, per_device_batch_size=2, learning_rate=1e-6,
                    replay_ratio=0.0, checkpoint_every=100, max_length=128)
    run_sft(cfg, tmp_path / "base", tmp_path / "dialogues.jsonl", tmp_path / "sft", None)
    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "sft" / "model" / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    # A step of 1e-6 is below bf16's resolution for most of these weights (about 1e-4 at 0.02).
    moved = after["model.layers.0.mlp.up_proj.weight"] - before["model.layers.0.mlp.up_proj.weight"].float()
    assert 0 < moved.abs().max() < 1e-4
