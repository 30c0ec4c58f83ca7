"""Packed dSFT, packed dDPO and packed KTO under two processes equal one process, with DDP, FSDP2 and
DeepSpeed ZeRO-2 and ZeRO-3, and a run killed after a checkpoint resumes to exactly the straight run.

Two processes are started by `torchrun --standalone --nproc_per_node 2` (tests/distributed_worker.py),
the engine set by the environment that `accelerate launch` derives from the shipped config
file (configs/accelerate/*.yaml). Both sides train at global batch 8 from 2 rows per device:
accumulation 2 over two processes, 4 in one. The two-process runs also recompute activations
(activation checkpointing), which must not change a gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from dalign.binarize import unpair
from dalign.config import DPOConfig, SFTConfig
from dalign.data import write_rows
from dalign.dpo import run_dpo
from dalign.losses import PreferenceLoss
from dalign.sft import run_sft
from test_dpo import world_pairs
from test_train import world_dialogues

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ENGINES = ["ddp", "fsdp2", "zero2", "zero3"]
STEPS, KILLED_AT = 6, 3
# 1e-4 on weights, 1e-5 relative on grad norms, 1e-6 on losses separate float noise (reduction
# order, amplified by Adam) from a wrong loop: a step taken at every micro-batch moves weights by ~1e-3.
WEIGHTS_ATOL, NORM_RTOL, LOSS_ATOL = 1e-4, 1e-5, 1e-6


def accelerate_env(config_file: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file F --num_processes 2` sets for its processes
    (accelerate.commands.launch.launch_command, without starting them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", "2", "unused.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world_tokenizer):
    """A tiny Llama (grouped-query attention, tied embeddings), world dialogues and pairs, the
    stage configs, and the one-process runs every engine is compared with."""
    folder = tmp_path_factory.mktemp("distributed")
    tok = world_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    write_rows(folder / "dialogues.jsonl", world_dialogues(40))
    write_rows(folder / "pairs.jsonl", world_pairs(24))
    write_rows(folder / "unpaired.jsonl", unpair(world_pairs(24)))
    common = dict(global_batch_size=8, per_device_batch_size=2, max_steps=STEPS, checkpoint_every=KILLED_AT,
                  log_every=1, learning_rate=1e-3, warmup_ratio=0.2, max_length=128, activation_checkpointing=True)
    sft, dpo = SFTConfig(replay_ratio=0.0, packing=True, **common), DPOConfig(packed=True, **common)
    (folder / "sft.json").write_text(sft.model_dump_json())
    (folder / "dpo.json").write_text(dpo.model_dump_json())
    kto = dpo.model_copy(update={"loss": PreferenceLoss.KTO})
    (folder / "kto.json").write_text(kto.model_dump_json())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = {"activation_checkpointing": False}
        one = {"sft": run_sft(sft.model_copy(update=plain), folder / "base", folder / "dialogues.jsonl",
                              folder / "one" / "sft", None),
               "dpo": run_dpo(dpo.model_copy(update=plain), folder / "base", folder / "base", folder / "pairs.jsonl",
                              folder / "one" / "dpo"),
               "kto": run_dpo(kto.model_copy(update=plain), folder / "base", folder / "base", folder / "unpaired.jsonl",
                              folder / "one" / "kto")}
    finally:
        torch.set_num_threads(threads)
    assert one["sft"]["gradient_accumulation"] == 4 and one["sft"]["processes"] == 1
    return folder


def launch(setup: Path, engine: str, jobs: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--setup", str(setup), "--jobs", *jobs] + (["--fsdp-on-cpu"] if engine == "fsdp2" else [])
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module", params=ENGINES)
def runs(request, setup, tmp_path_factory):
    """Under one engine: each stage straight through, and each killed after its step-3
    checkpoint then relaunched (three launches in all)."""
    engine, out = request.param, tmp_path_factory.mktemp(request.param)
    env = accelerate_env(ROOT / "configs" / "accelerate" / f"{engine}.yaml")
    if engine == "zero3":
        # A model this small is below the default persistence threshold: without 0 nothing is partitioned.
        ds = json.loads((ROOT / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (out / "zero3.json").write_text(json.dumps(ds))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(out / "zero3.json")
    layouts = {}
    for jobs, killed in (([f"sft:{out}/sft", f"dpo:{out}/dpo", f"kto:{out}/kto", f"sft:{out}/sft-k:kill={KILLED_AT}"], "sft"),
                         ([f"sft:{out}/sft-k", f"dpo:{out}/dpo-k:kill={KILLED_AT}"], "dpo"),
                         ([f"dpo:{out}/dpo-k"], None)):
        done = launch(setup, engine, jobs, env)
        if killed is None:
            assert done.returncode == 0, done.stderr[-4000:]
        else:  # the last job's rank 0 was killed: the launch fails, the checkpoint before it stays
            assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-4000:]
            ckpt = out / f"{killed}-k" / "checkpoints"
            layouts[killed] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
            assert not (out / f"{killed}-k" / "model").exists()
    return engine, out, layouts


def ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto"])  # KTO: its reference point gathered over the processes
def test_two_processes_equal_one(runs, setup, stage):
    engine, out, _ = runs
    for seen in ranks(out / stage):  # the launch really ran two processes under the engine asked for
        assert seen["processes"] == 2 and seen["engine"] == engine
        # FSDP2 and ZeRO-3 hand back every parameter as a shard; DDP and ZeRO-2 keep them whole.
        assert seen["sharded"] == (seen["parameters"] if engine in ("fsdp2", "zero3") else 0), seen
    one, two = setup / "one" / stage, out / stage
    start = load_file(setup / "base" / "model.safetensors")
    w1, w2 = (load_file(p / "model" / "model.safetensors") for p in (one, two))
    assert w1.keys() == w2.keys()
    for key in w1:
        assert w2[key].shape == w1[key].shape, key  # a ZeRO-3 save from one rank writes empty tensors
        assert torch.allclose(w2[key], w1[key], atol=WEIGHTS_ATOL, rtol=0), (key, (w2[key] - w1[key]).abs().max())
    assert max((w1[k] - start[k]).abs().max() for k in w1) > 10 * WEIGHTS_ATOL  # the runs trained
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(range(1, STEPS + 1))
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_ATOL, rel=0), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=NORM_RTOL), a["step"]
        assert b["lr"] == a["lr"]
    assert ranks(two)[0]["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}.get(engine, "DEEPSPEED")


# What each engine's checkpoint holds: one file of weights, or one shard per process.
SHARDS = {"ddp": ["model.safetensors", "optimizer.bin"],
          "fsdp2": ["optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp",
                    "pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"],
          "zero2": ["pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
          "zero3": ["pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
                    "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt",
                    "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_run_killed_after_a_checkpoint_resumes_exactly(runs, stage):
    engine, out, layouts = runs
    held = [name.removeprefix(f"step-{KILLED_AT}/") for name in layouts[stage]]
    assert all(name.startswith(f"step-{KILLED_AT}/") for name in layouts[stage])  # whole, and only it
    assert set(SHARDS[engine]) <= set(held) and "state.json" in held, held
    straight, resumed = out / stage, out / f"{stage}-k"
    a, b = (load_file(p / "model" / "model.safetensors") for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))  # no step logged twice, none missing
    for x, y in zip(ma, mb):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"]), x["step"]


@pytest.mark.parametrize("name, engine", [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("zero2", "zero2"), ("zero3", "zero3"),
                                          ("zero3-multinode", "zero3")])
def test_each_shipped_accelerate_config_asks_for_its_engine(name, engine, monkeypatch):
    from dalign.parallel import launched_engine

    for key, value in accelerate_env(ROOT / "configs" / "accelerate" / f"{name}.yaml").items():
        monkeypatch.setenv(key, value)
    assert launched_engine().value == engine
