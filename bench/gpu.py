"""The GPU check (bench/gpu_check.sh): SFT and DPO of a SmolLM2-135M-shaped model in bf16, dalign
against TRL's fastest GPU settings on the same rows, and the packed FlexAttention kernel
against the per-span one.

    python -m bench.gpu [--length 1024] [--rows 256] [--batch 8] [--out bench/results/gpu.json]

The weights are SmolLM2-135M's shape with random values (its own weights change no timing and
need no hub); rows and tokenizer are bench.common's. TRL runs padded and padding-free SFT, and
DPO with precomputed reference log-probs, with flash-attention 2 and Liger where installed
(the results say which). The kernel check compares, on the GPU, the log-probs and gradients of
one packed DPO batch and one packed SFT batch through FlexAttention with the per-span loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib.metadata import version
from pathlib import Path

import torch

from bench import common, trainers
from bench.run import _compare, _record, table


def bf16_peak() -> float:
    """bf16 matmul FLOP/s of this GPU: the best of ten 8192-cube products after warm-up."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1000))
    return best


def kernel_check(rows: list[common.Row], length: int) -> dict:
    """Largest differences between FlexAttention and the per-span loop over one packed DPO batch
    and one packed SFT batch: log-probs and every parameter's gradient, in fp32 and under bf16."""
    from dalign.packed import collate_packed, collate_packed_pairs, packed_attention, packed_logits, packed_token_logps
    from dalign.parallel import autocast
    from dalign.train import pack, to_device

    model = common.model("135M", length).to(common.DEVICE)
    sft = to_device(collate_packed(pack(trainers.sft_examples(rows[:16]), length)), common.DEVICE)
    dpo = to_device(collate_packed_pairs(trainers.dpo_pairs(rows[:8])), common.DEVICE)
    out = {}
    for precision in ("no", "bf16"):
        runs = {}
        for flex in (False, True):
            model.zero_grad()
            with packed_attention(model), autocast(common.DEVICE, precision):
                logps, _ = packed_token_logps(model, dpo, flex)
                sft_loss = torch.nn.functional.cross_entropy(packed_logits(model, sft, flex), sft["targets"])
                (sft_loss - logps.mean()).backward()
            runs[flex] = (logps.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()])
        (la, ga), (lb, gb) = runs[False], runs[True]
        out[precision] = {"logps_max_abs_diff": float((la - lb).abs().max()),
                          "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(ga, gb)),
                          "grad_max_abs": max(float(a.abs().max()) for a in ga)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="135M", choices=list(common.SIZES))
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--cpu", action="store_true", help="try the script on a CPU (fp32, no kernel check, no MFU)")
    args = ap.parse_args(argv)
    if not common.GPU and not args.cpu:
        raise SystemExit("bench.gpu needs a CUDA GPU (--cpu tries it on a CPU)")
    attention, liger = common.peer_gpu_options()
    peak = bf16_peak() if common.GPU else common.matmul_peak(0.5)
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if common.GPU else None,
            "matmul_peak_tflops": peak / 1e12,
            "peer_attention": attention, "peer_liger": liger,
            "versions": {p: version(p) for p in ("torch", "transformers", "trl", "accelerate")}}
    print(json.dumps(meta), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = common.rows(args.rows, args.length)
    result = {"meta": meta, "kernels": kernel_check(rows, args.length) if common.GPU else None}
    print(json.dumps(result["kernels"]), flush=True)
    out.write_text(json.dumps(result, indent=1))
    model = common.model(args.size, args.length)
    res = {"size": args.size, "parameters": sum(p.numel() for p in model.parameters()), "max_length": args.length,
           "rows": args.rows, "batch": args.batch}
    f = common.sft_flops(model, rows)
    res["sft"] = _compare([
        _record("trl", trainers.trl_sft(args.size, rows, args.batch, args.length, padding_free=False), f, peak),
        _record("trl padding_free", trainers.trl_sft(args.size, rows, args.batch, args.length, padding_free=True), f, peak),
        _record("dalign", trainers.dalign_sft(args.size, rows, args.batch, args.length), f, peak)])
    print(table([res]), flush=True)
    f = common.dpo_flops(model, rows)
    res["dpo"] = _compare([
        _record("trl precompute_ref_log_probs",
                trainers.trl_dpo(args.size, rows, args.batch, args.length, precompute=True), f, peak),
        _record("dalign", trainers.dalign_dpo(args.size, rows, args.batch, args.length, packed=True), f, peak)],
        first=math.log(2))  # at step one the policy is the reference
    result["training"] = [res]
    out.write_text(json.dumps(result, indent=1))
    print(table([res]))


if __name__ == "__main__":
    main()
