"""Stage 1a: UltraChat-style dialogues, written by a user simulator and a teacher.

From each seed topic the user simulator opens a dialogue and asks follow-ups; the teacher
answers every turn. Dialogues are made in chunks, each written whole to its own part
file, so a killed run resumes at the first missing part and no row is lost or doubled.
Empty, duplicate and over-long dialogues are dropped and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from dalign.backends import Backend, Sampling
from dalign.chat import render
from dalign.config import DialoguesConfig
from dalign.data import read_rows, write_rows
from dalign.world.roles import seed_topics


def _turns(topic: str, cfg: DialoguesConfig) -> int:
    rng = random.Random(f"{cfg.seed}:{topic}")
    return rng.randint(cfg.min_turns, cfg.max_turns)


def _make_chunk(topics: list[str], cfg: DialoguesConfig, user: Backend, teacher: Backend) -> list[list[dict]]:
    """All dialogues of a chunk, advanced turn by turn in batches (one call per role per turn)."""
    convs = [[{"role": "system", "content": t}] for t in topics]
    turns = [_turns(t, cfg) for t in topics]
    for turn in range(max(turns)):
        active = [i for i, n in enumerate(turns) if n > turn]
        questions = user.generate([convs[i] for i in active], Sampling(temperature=0.7, seed=cfg.seed))
        for i, q in zip(active, questions):
            convs[i].append({"role": "user", "content": q})
        # The teacher never sees the simulator's topic prompt, only the dialogue.
        answers = teacher.generate([convs[i][1:] for i in active], Sampling(temperature=0.7, seed=cfg.seed))
        for i, a in zip(active, answers):
            convs[i].append({"role": "assistant", "content": a})
    return [c[1:] for c in convs]


def run_dialogues(cfg: DialoguesConfig, tokenizer, user: Backend, teacher: Backend, out: Path) -> dict:
    topics = seed_topics(cfg.n_dialogues, cfg.seed)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    dropped: Counter = Counter()
    kept_total = 0
    for k, start in enumerate(range(0, len(topics), cfg.chunk_size)):
        part, stats = parts / f"part-{k:05d}.jsonl", parts / f"part-{k:05d}.stats.json"
        chunk = topics[start:start + cfg.chunk_size]
        if part.exists() and stats.exists():  # the part file is written last: it marks the chunk done
            rows = read_rows(part)
            dropped.update(json.loads(stats.read_text()))
            seen.update(_fingerprint(r["messages"]) for r in rows)
            kept_total += len(rows)
            continue
        rows, chunk_dropped = [], Counter()
        for index, (topic, messages) in enumerate(zip(chunk, _make_chunk(chunk, cfg, user, teacher)), start):
            reason = _reject(messages, seen, tokenizer, cfg.max_tokens)
            if reason:
                chunk_dropped[reason] += 1
                continue
            seen.add(_fingerprint(messages))
            rows.append({"id": f"dialogue-{cfg.seed}-{index}", "messages": messages, "topic": topic,
                         "teacher": teacher.name, "user_simulator": user.name})
        stats.write_text(json.dumps(chunk_dropped))
        write_rows(part, rows)
        dropped.update(chunk_dropped)
        kept_total += len(rows)
    all_rows = [row for part in sorted(parts.glob("part-*.jsonl")) for row in read_rows(part)]
    write_rows(out / "dialogues.jsonl", all_rows)
    return {"rows": {"kept": kept_total, "dropped": dict(dropped)}, "topics": len(topics),
            "teacher": teacher.name, "user_simulator": user.name}


def _fingerprint(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def _reject(messages: list[dict], seen: set[str], tokenizer, max_tokens: int) -> str | None:
    if any(not m["content"].strip() for m in messages):
        return "empty_message"
    if _fingerprint(messages) in seen:
        return "duplicate"
    if len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]) > max_tokens:
        return "too_long"
    return None
