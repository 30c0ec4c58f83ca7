"""The engine a training stage runs under, chosen by the launch and applied in one place.

dalign's loop (dalign.train) does not know which engine wrapped the model. The engine comes
from how the stage was launched, as accelerate's launcher states it in the environment:
`accelerate launch --config_file configs/accelerate/F.yaml` (DDP, FSDP2 or DeepSpeed ZeRO),
or `torchrun` (DDP). Each silent trap of these engines on a given machine (a launch that
quietly runs as one process, FSDP quietly replaced by DDP, DeepSpeed's "rank 0 of 1") is
refused here with a message, never run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # DeepSpeed finds the CPU by itself but warns so in every process; naming it is the same, quietly.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class LaunchError(RuntimeError):
    """A launch that would not run as it says (wrong process count, engine or precision)."""


class Engine(str, Enum):
    DDP = "ddp"  # every process holds the whole model; gradients averaged (one process: plain training)
    FSDP2 = "fsdp2"  # torch fully_shard: weights, gradients and optimizer states sharded
    ZERO2 = "zero2"  # DeepSpeed ZeRO-2: gradients and optimizer states partitioned
    ZERO3 = "zero3"  # DeepSpeed ZeRO-3: parameters too

    @property
    def shards_weights(self) -> bool:
        return self in (Engine.FSDP2, Engine.ZERO3)

    @property
    def deepspeed(self) -> bool:
        return self in (Engine.ZERO2, Engine.ZERO3)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_processes() -> int:
    """Processes of this launch over all nodes, as torchrun (and accelerate launch) state it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_engine() -> Engine:
    """The engine accelerate's launcher asked for (DDP when none, or under plain torchrun)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None:  # a DeepSpeed JSON of our own: its stage is in the file
            stage = str(_deepspeed_json().get("zero_optimization", {}).get("stage", 2))  # accelerate's default
        if stage not in ("2", "3"):
            raise LaunchError(f"DeepSpeed ZeRO stage {stage}: dalign runs stages 2 and 3 (or DDP without DeepSpeed)")
        return Engine.ZERO2 if stage == "2" else Engine.ZERO3
    if _env_true("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise LaunchError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                              "(configs/accelerate/fsdp2.yaml); accelerate's default is still 1")
        return Engine.FSDP2
    return Engine.DDP


def _deepspeed_json() -> dict:
    import json

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}


def _state_kwargs(engine: Engine) -> dict:
    """How accelerate must be told about this machine. On a CPU, DDP needs cpu=True (else each
    process runs alone), and DeepSpeed needs gloo named and cpu left unset (cpu=True drops it)."""
    if torch.cuda.is_available():
        return {}
    return {"backend": "gloo"} if engine.deepspeed else {"cpu": True}


_launch_type = None  # the process state's distributed type before any Accelerator upgraded it


def process_state():
    """accelerate's process state for this launch (rank, world, barriers), set up once."""
    from accelerate import PartialState

    global _launch_type
    state = PartialState(**_state_kwargs(launched_engine()))
    if _launch_type is None:
        _launch_type = state.distributed_type
    if state.num_processes != launched_processes():
        raise LaunchError(f"the launch started {launched_processes()} processes but accelerate sees "
                          f"{state.num_processes}: each would train alone on the whole data")
    return state


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0; also true without a launch)."""
    return launched_processes() == 1 or process_state().is_main_process


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a launch)."""
    if launched_processes() == 1:
        return 0, 1
    state = process_state()
    return state.process_index, state.num_processes


def barrier() -> None:
    if launched_processes() > 1:
        process_state().wait_for_everyone()


def gather_shares(share: list, total: int) -> list:
    """Every process's results for rows rank, rank + world, ..., put back in row order, on every process."""
    from accelerate.utils import gather_object

    world = launched_processes()
    if world == 1:
        return list(share)
    shares = gather_object([share])  # one list per process, in rank order
    rows: list = [None] * total
    for rank, part in enumerate(shares):
        rows[rank::world] = part
    return rows


def sum_numbers(shares: list[dict]) -> dict:
    """Dicts merged key by key: numbers summed (nested dicts too), other values the first share's
    that has one. Counts of requests and tokens from several processes or servers."""
    def add(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: add(a[k], b[k]) if k in b else a[k] for k in a} | {k: v for k, v in b.items() if k not in a}
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return a + b
        return a if a is not None else b

    total: dict = {}
    for share in shares:
        total = add(total, share)
    return total


def summed_over_processes(facts: dict) -> dict:
    """`facts` with every number summed over the processes of the launch (counts of requests,
    tokens, seconds), other values rank 0's; as is without a launch. Every process must call it."""
    if launched_processes() == 1:
        return facts
    from accelerate.utils import gather_object

    return sum_numbers(gather_object([facts]))  # one dict per process, in rank order


def autocast(device: torch.device, mixed_precision: str):
    """The training precision's autocast for a forward outside the loop (reference log-probs)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass(frozen=True)
class BatchSizes:
    """How one optimizer step's rows are split: global = per_device x accumulation x processes."""

    per_device: int
    accumulation: int
    processes: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.processes

    def as_dict(self) -> dict[str, int]:
        return {"global_batch_size": self.global_batch, "per_device_batch_size": self.per_device,
                "gradient_accumulation": self.accumulation, "processes": self.processes}


def build_accelerator(mixed_precision: str, accumulation: int, max_grad_norm: float, per_device: int):
    """The Accelerator for one training stage, with every engine's setting that the recipe owns
    (precision, accumulation, clipping) stated, and the engine checked to be the one launched."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    engine = launched_engine()
    launch_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launch_precision not in ("no", mixed_precision):
        raise LaunchError(f"the launch asks for mixed precision {launch_precision} and the recipe for "
                          f"{mixed_precision}: set train.mixed_precision in the recipe, and 'no' (or the same) "
                          "in the accelerate config")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise LaunchError("mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")
    process_state()
    # Each training stage starts from the launch's settings: accelerate keeps the first stage's
    # precision and DeepSpeed config (its "auto" values filled in) for the life of the process
    # unless its state, not the process group, is reset.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # The last Accelerator wrote its engine (FSDP, DEEPSPEED) into the process state, and accelerate
    # upgrades to FSDP only from the plain multi-device type: put that back.
    PartialState._shared_state["distributed_type"] = _launch_type
    kwargs = _state_kwargs(engine)
    handlers = [InitProcessGroupKwargs(backend=kwargs.pop("backend"))] if "backend" in kwargs else []
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation,
                              kwargs_handlers=handlers, **kwargs)
    expected = {Engine.DDP: (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU),
                Engine.FSDP2: (DistributedType.FSDP,), Engine.ZERO2: (DistributedType.DEEPSPEED,),
                Engine.ZERO3: (DistributedType.DEEPSPEED,)}[engine]
    if accelerator.distributed_type not in expected:
        raise LaunchError(f"the launch asks for {engine.value} but accelerate set up {accelerator.distributed_type.value}"
                          + (" (accelerate enables FSDP on GPUs only)" if engine is Engine.FSDP2 else ""))
    if engine.deepspeed:
        if str(accelerator.state.deepspeed_plugin.zero_stage) != engine.value[-1]:
            raise LaunchError(f"accelerate set up ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage}, "
                              f"the launch said {engine.value}")
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # The recipe owns these (accelerate cannot infer the batch without a dataloader, and would
        # fill clipping with 1.0); a config file that fixes them otherwise is refused.
        for key, value in (("train_micro_batch_size_per_gpu", per_device), ("gradient_accumulation_steps", accumulation),
                           ("gradient_clipping", max_grad_norm),
                           ("train_batch_size", per_device * accumulation * accelerator.num_processes)):
            if ds.get(key, "auto") not in ("auto", value):
                raise LaunchError(f"the DeepSpeed config sets {key} to {ds[key]}, the recipe needs {value}: "
                                  'set it to "auto" (configs/accelerate/zero3.json does)')
            ds[key] = value
    return accelerator, engine


def clip_gradients(accelerator, engine: Engine, params: list, max_norm: float) -> float:
    """The gradient norm over every process, and the gradients clipped to `max_norm` as torch's
    clip_grad_norm_ clips them. The norm is summed in float64: torch's fp32 sum over a model's
    gradients drifts by about 1e-5 relative, more than sharding changes it. DeepSpeed clips
    inside its own step and reports the norm it used."""
    if engine.deepspeed:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    from torch.distributed.tensor import DTensor

    accelerator.unscale_gradients()  # fp16: the loss scale comes off before the norm
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for mesh in {g.device_mesh for g in grads if isinstance(g, DTensor)}:
        # Each process holds a shard of every parameter (FSDP2): its sum of squares, summed over the mesh.
        shards = [g.to_local() for g in grads if isinstance(g, DTensor) and g.device_mesh == mesh]
        if mesh.ndim != 1 or not all(p.is_shard() for g in grads if isinstance(g, DTensor) for p in g.placements):
            raise LaunchError("gradient clipping supports FSDP2 over one mesh dimension (full shard), not HSDP")
        part = sum(t.double().pow(2).sum() for t in shards)
        torch.distributed.all_reduce(part, group=mesh.get_group())
        total += part
    total += sum((g.double().pow(2).sum() for g in grads if not isinstance(g, DTensor)), torch.zeros_like(total))
    norm = float(total.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return norm


def end_training(accelerator) -> None:
    """Leave the process as a training stage found it. accelerate registers every ZeRO-3 config
    with transformers, whose from_pretrained then partitions each model it loads (zero.Init),
    even with zero3_init_flag off: a later stage's reference model would come out empty."""
    from transformers.integrations import unset_hf_deepspeed_config

    accelerator.free_memory()  # drops accelerate's references to the engine, model and optimizer
    unset_hf_deepspeed_config()
