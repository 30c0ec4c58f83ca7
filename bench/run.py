"""`make bench`: dalign against TRL, one after the other in this one process.

    python -m bench.run [--sizes 7M 34M] [--lengths 512 256 1024 2048] [--rows 64] [--batch 8]
                        [--parts sft dpo generation] [--padded] [--out bench/results.json]

For every size and length: SFT (TRL padded, TRL padding-free, dalign) and DPO (TRL, TRL with
precomputed reference log-probs, dalign; with --padded also dalign's unpacked path), each one
epoch over the same rows. Every length trains on about the same number of tokens: --rows at
512, proportionally fewer rows when they are longer, never fewer than four batches. Prints a
table and writes every figure as JSON after each length, so an interrupted run keeps what it
measured. Ratios are dalign over TRL's fastest configuration; DPO is timed end to end, any
reference precompute included. Model FLOP utilisation is the least model work that gives the
loss (common.sft_flops, common.dpo_flops) per second, over the fp32 matmul peak taken at the
start of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from bench import common, generation, plot, trainers


def _record(name: str, result: dict, flops: float, peak: float) -> dict:
    return {"trainer": name, **result, "tokens_per_s": result["useful_tokens"] / result["seconds"],
            "mfu": flops / result["seconds"] / peak}


def rows_at(length: int, rows_at_512: int, batch: int) -> int:
    return max(4 * batch, round(rows_at_512 * 512 / length))


def bench_size(size: str, length: int, n_rows: int, batch: int, parts: list[str], peak: float,
               padded: bool = False) -> dict:
    rows = common.rows(n_rows, length)
    model = common.model(size, length)
    params = sum(p.numel() for p in model.parameters())
    out = {"size": size, "parameters": params, "max_length": length, "rows": n_rows, "batch": batch}
    if "sft" in parts:
        f = common.sft_flops(model, rows)
        runs = [_record("trl", trainers.trl_sft(size, rows, batch, length, padding_free=False), f, peak),
                _record("trl padding_free", trainers.trl_sft(size, rows, batch, length, padding_free=True), f, peak),
                _record("dalign", trainers.dalign_sft(size, rows, batch, length), f, peak)]
        out["sft"] = _compare(runs)
    if "dpo" in parts:
        f = common.dpo_flops(model, rows)
        runs = [_record("trl", trainers.trl_dpo(size, rows, batch, length, precompute=False), f, peak),
                _record("trl precompute_ref_log_probs", trainers.trl_dpo(size, rows, batch, length, precompute=True), f, peak)]
        if padded:
            runs.append(_record("dalign padded", trainers.dalign_dpo(size, rows, batch, length, packed=False), f, peak))
        runs.append(_record("dalign", trainers.dalign_dpo(size, rows, batch, length, packed=True), f, peak))
        out["dpo"] = _compare(runs, first=math.log(2))  # at step one the policy is the reference
    return out


def _first(run: dict) -> float:
    return run["first_loss_logged"] if "first_loss_logged" in run else run["first_loss"]


def _compare(runs: list[dict], first: float | None = None) -> dict:
    """Ratios against TRL's fastest run; each first-step loss against `first` (dalign's when
    no exact value is known)."""
    peers = [r for r in runs if r["trainer"].startswith("trl")]
    ours = next(r for r in runs if r["trainer"] == "dalign")
    fastest = max(peers, key=lambda r: r["tokens_per_s"])
    first = ours["first_loss"] if first is None else first
    for r in runs:
        r["first_loss_error"] = abs(_first(r) - first)
    return {"runs": runs, "fastest_peer": fastest["trainer"], "speed_ratio": ours["tokens_per_s"] / fastest["tokens_per_s"],
            "memory_ratio": ours["peak_gib"] / fastest["peak_gib"] if fastest["peak_gib"] > 0 else None}


def table(results: list[dict]) -> str:
    lines = ["| part | model | length | trainer | tokens/s | MFU | peak GiB | first-loss diff |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for part in ("sft", "dpo"):
            if part not in res:
                continue
            for r in res[part]["runs"]:
                lines.append(f"| {part} | {res['size']} | {res['max_length']} | {r['trainer']} | {r['tokens_per_s']:,.0f} | "
                             f"{r['mfu']:.0%} | {r['peak_gib']:.2f} | {r.get('first_loss_error', 0):.1e} |")
            c = res[part]
            mem = f"{c['memory_ratio']:.2f}" if c["memory_ratio"] is not None else "-"
            lines.append(f"| {part} | {res['size']} | {res['max_length']} | **dalign / {c['fastest_peer']}** | "
                         f"**{c['speed_ratio']:.2f}x** | | {mem}x | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["7M", "34M"], choices=list(common.SIZES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 256, 1024, 2048],
                    help="512 first: the targets are set there")
    ap.add_argument("--rows", type=int, default=64, help="rows per trainer at length 512: one epoch over them")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--parts", nargs="+", default=["sft", "dpo", "generation"], choices=["sft", "dpo", "generation"])
    ap.add_argument("--padded", action="store_true", help="also time dalign's unpacked DPO path")
    ap.add_argument("--out", default="bench/results.json")
    args = ap.parse_args(argv)
    peak = common.matmul_peak()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads", "matmul_peak_gflops": peak / 1e9,
            "versions": {p: version(p) for p in ("torch", "transformers", "trl", "dalign")}}
    print(json.dumps(meta))
    out, results, gen = Path(args.out), [], None

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "training": results, "generation": gen}, indent=1))

    if "generation" in args.parts:
        gen = generation.compare(args.sizes[0], 64, 16, 64)
        print(f"generation ({args.sizes[0]}, 64 prompts, batch 16, 64 new tokens): local backend "
              f"{gen['local_backend_tokens_per_s']:,.0f} tokens/s, one at a time {gen['one_at_a_time_tokens_per_s']:,.0f}: "
              f"{gen['ratio']:.1f}x", flush=True)
        save()
    for length in args.lengths:
        for size in args.sizes:
            if {"sft", "dpo"} & set(args.parts):
                n = rows_at(length, args.rows, args.batch)
                results.append(bench_size(size, length, n, args.batch, args.parts, peak, args.padded))
                print(table(results[-1:]), flush=True)
                save()
    print(table(results))
    if results:
        plot.draw(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
