"""One process of a multi-process training test: tests/test_distributed.py starts two with
`torchrun --standalone --nproc_per_node 2`, the engine chosen by accelerate's environment, as
`accelerate launch --config_file configs/accelerate/F.yaml` would set it.

Each job trains one stage with dalign's own functions on the test's prepared inputs:
  sft:OUT          dSFT of SETUP/base on SETUP/dialogues.jsonl with the config SETUP/sft.json
  dpo:OUT          dDPO of SETUP/base on SETUP/pairs.jsonl with SETUP/dpo.json
  kto:OUT          KTO of SETUP/base on SETUP/unpaired.jsonl with SETUP/kto.json
  ...:OUT:kill=N   the same, rank 0 killed with SIGKILL right after the step-N checkpoint
Each rank writes OUT/rank-R.json: what it saw (processes, engine, how many parameters came
back from `prepare` as shards).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch


FACTS: dict = {}  # of the job being run


def report_prepare() -> None:
    """Record in FACTS, from inside the loop, what the engine made of the model."""
    import dalign.train as loop

    build = loop.parallel.build_accelerator

    def spying_build(*args, **kwargs):
        accelerator, engine = build(*args, **kwargs)
        prepare = accelerator.prepare

        def spying_prepare(*objects):
            prepared = prepare(*objects)
            params = list(prepared[0].parameters())
            # ZeRO-3 leaves an empty tensor in place of a partitioned parameter; FSDP2 a DTensor shard.
            sharded = sum(p.numel() == 0 or (hasattr(p, "to_local") and p.to_local().numel() < p.numel())
                          for p in params)
            FACTS.update(processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
                         engine=engine.value, parameters=len(params), sharded=int(sharded))
            return prepared

        accelerator.prepare = spying_prepare
        return accelerator, engine

    loop.parallel.build_accelerator = spying_build


def die_after_checkpoint(step: int) -> None:
    import dalign.train as loop

    save = loop.save_checkpoint

    def save_then_die(accelerator, folder, done, keep):
        save(accelerator, folder, done, keep)
        if done == step and accelerator.is_main_process:
            os.kill(os.getpid(), signal.SIGKILL)

    loop.save_checkpoint = save_then_die


def fsdp_on_cpu() -> None:
    """accelerate enables FSDP only on GPU-like machines; relabelling the process state as
    multi-GPU before the Accelerator is built runs its real FSDP2 path on these CPUs (test only)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    state._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", type=Path, required=True)
    parser.add_argument("--jobs", nargs="+", required=True)
    parser.add_argument("--fsdp-on-cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fsdp_on_cpu:
        fsdp_on_cpu()
    from dalign.config import DPOConfig, SFTConfig
    from dalign.dpo import run_dpo
    from dalign.sft import run_sft

    report_prepare()
    for job in args.jobs:
        stage, out, *kill = job.split(":")
        out = Path(out)
        FACTS.clear()
        if kill:
            die_after_checkpoint(int(kill[0].removeprefix("kill=")))
        setup = args.setup
        if stage == "sft":
            cfg = SFTConfig.model_validate_json((setup / "sft.json").read_text())
            run_sft(cfg, setup / "base", setup / "dialogues.jsonl", out, None)
        else:
            rows = "pairs" if stage == "dpo" else "unpaired"
            cfg = DPOConfig.model_validate_json((setup / f"{stage}.json").read_text())
            run_dpo(cfg, setup / "base", setup / "base", setup / f"{rows}.jsonl", out)
        (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(FACTS))


if __name__ == "__main__":
    main()
