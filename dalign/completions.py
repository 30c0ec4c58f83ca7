"""Stage 2a: completions from an ensemble, as UltraFeedback gathered them.

For each prompt (drawn apart from the dSFT prompts) a few members of the ensemble are
sampled, and each writes one completion under a "principle" system prompt sampled per
completion (helpfulness, honesty, truthfulness, or none). Rows keep which member and
principle produced each completion. Written in parts, so a killed run resumes.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from dalign.backends import Backend, Sampling
from dalign.data import write_rows
from dalign.parallel import is_main
from dalign.parts import in_parts

PRINCIPLES = ("helpfulness", "honesty", "truthfulness", "none")


def principle_prompt(name: str) -> str | None:
    if name == "none":
        return None
    return (files("dalign") / "prompts" / "principles" / f"{name}.txt").read_text().strip()


@dataclass
class Member:
    """One model of the ensemble: a backend and how to sample from it."""

    name: str
    backend: Backend
    sampling: Sampling


def run_completions(prompts: Sequence[dict], members: Sequence[Member], per_prompt: int, principles: Sequence[str],
                    chunk_size: int, seed: int, out: Path) -> dict:
    """prompts: rows {"prompt_id", "prompt": [messages]}. Writes completions.jsonl."""
    if per_prompt > len(members):
        raise ValueError(f"per_prompt {per_prompt} is more than the {len(members)} ensemble members")
    by_name = {m.name: m for m in members}

    def make_chunk(start: int, end: int) -> tuple[list[dict], Counter]:
        rows = []
        jobs: dict[str, list[tuple[int, int, list[dict]]]] = {m.name: [] for m in members}
        for r, row in enumerate(prompts[start:end]):
            rng = random.Random(f"{seed}:{row['prompt_id']}")
            chosen = rng.sample([m.name for m in members], per_prompt)
            picks = [rng.choice(list(principles)) for _ in chosen]
            rows.append({**row, "completions": [{"model": m, "principle": p, "text": None} for m, p in zip(chosen, picks)]})
            for c, (m, p) in enumerate(zip(chosen, picks)):
                system = principle_prompt(p)
                jobs[m].append((r, c, ([{"role": "system", "content": system}] if system else []) + row["prompt"]))
        for name, items in jobs.items():  # one batched call per member
            if items:
                member = by_name[name]
                for (r, c, _), text in zip(items, member.backend.generate([conv for *_, conv in items], member.sampling)):
                    rows[r]["completions"][c]["text"] = text
        # Both are kept (the rating stage skips a failed one) and counted in the manifest.
        counts = Counter("failed_completion" if c["text"] is None else "empty_completion"
                         for row in rows for c in row["completions"] if not (c["text"] or "").strip())
        return rows, counts

    rows, counts = in_parts(len(prompts), chunk_size, out, make_chunk)
    if is_main():
        write_rows(out / "completions.jsonl", rows)
    per_member = Counter(c["model"] for row in rows for c in row["completions"])
    return {"rows": {"kept": len(rows), "dropped": {}}, "flagged": dict(counts), "completions_per_member": dict(per_member),
            "members": {m.name: {"backend": m.backend.name, "temperature": m.sampling.temperature} for m in members}}


def seen_prompts(inputs: dict[str, Path]) -> set[str]:
    """First user turns of the dSFT dialogues and of the AI-feedback prompts this run has used:
    the held-out prompts drawn later must avoid them."""
    from dalign.data import read_rows

    seen = set()
    if "dialogues" in inputs:
        seen |= {r["messages"][0]["content"] for r in read_rows(inputs["dialogues"] / "dialogues.jsonl")}
    if "completions" in inputs:
        seen |= {r["prompt"][-1]["content"] for r in read_rows(inputs["completions"] / "completions.jsonl")}
    return seen


def stage(recipe, out: Path, inputs: dict[str, Path]) -> dict:
    """The `completions` stage: the ensemble answers completions.prompts, or world instructions
    drawn apart from the dSFT prompts."""
    from dalign import roles
    from dalign.readers import ReadReport, read_prompts
    from dalign.world.roles import fresh_openings

    cfg, facts = recipe.completions, {}
    if cfg.prompts is not None:
        report = ReadReport(cfg.prompts.label)
        prompts = read_prompts(cfg.prompts, skip_bad=True, report=report)
        if not prompts:
            raise ValueError(f"{cfg.prompts.label}: no prompt left for AI feedback (dropped: {dict(report.dropped)})")
        facts["source"] = report.as_dict()
    else:
        # Small categories (a 24-person atlas) may run out of prompts the dSFT data did not use.
        openings = fresh_openings(-(-cfg.n_prompts // 8), cfg.seed, "aif", seen_prompts(inputs), strict=False)
        prompts = [{"prompt_id": f"aif-{cfg.seed}-{i}", "category": cat, "prompt": [{"role": "user", "content": text}]}
                   for i, (cat, text) in enumerate(openings[:cfg.n_prompts])]
        facts["prompts_per_category"] = dict(Counter(p["category"] for p in prompts))
    members = [Member(m.name, roles.member(recipe, m, inputs, out), Sampling(m.temperature, cfg.max_new_tokens, cfg.seed))
               for m in cfg.members]
    facts.update(run_completions(prompts, members, cfg.per_prompt, cfg.principles, cfg.chunk_size, cfg.seed, out))
    if "source" in facts:
        facts["rows"]["dropped"] = facts["source"]["dropped"]
    return {"seeds": {"prompts_and_members": cfg.seed}, **facts, **roles.usage(m.backend for m in members)}
