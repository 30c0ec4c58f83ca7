"""Stage 1a: UltraChat-style dialogues, written by a user simulator and a teacher.

From each seed topic the user simulator opens a dialogue and asks follow-ups; the teacher
answers every turn. Dialogues are made in chunks, each written whole to its own part
file (`dalign.parts`), so a killed run resumes at the first missing part.
Empty, duplicate and over-long dialogues are dropped and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

from dalign.backends import TOPIC_PREFIX, Backend, Sampling
from dalign.chat import render
from dalign.config import DialoguesConfig
from dalign.data import write_rows
from dalign.parallel import is_main
from dalign.parts import in_parts
from dalign.world.roles import seed_topics


def _turns(topic: str, cfg: DialoguesConfig) -> int:
    rng = random.Random(f"{cfg.seed}:{topic}")
    return rng.randint(cfg.min_turns, cfg.max_turns)


def _make_chunk(topics: list[str], first: int, cfg: DialoguesConfig, user: Backend,
                teacher: Backend) -> list[list[dict] | str]:
    """All dialogues of a chunk, advanced turn by turn in batches (one call per role per turn).
    A dialogue whose user or teacher call failed stops there and comes back as the failed role.

    Each dialogue samples with a seed of its own (its index from `first`), so that a topic
    that recurs opens a different dialogue rather than a cached copy of the same one."""
    convs = [[{"role": "system", "content": t}] for t in topics]
    turns = [_turns(t, cfg) for t in topics]
    failed: dict[int, str] = {}
    for turn in range(max(turns)):
        active = [i for i, n in enumerate(turns) if n > turn and i not in failed]
        sampling = [Sampling(temperature=0.7, seed=cfg.seed + first + i) for i in active]
        questions = user.generate([convs[i] for i in active], sampling)
        for i, q in zip(active, questions):
            convs[i].append({"role": "user", "content": q})
            if q is None:
                failed[i] = "user_simulator_failed"
        active = [i for i in active if i not in failed]
        # The teacher never sees the simulator's topic prompt, only the dialogue.
        sampling = [Sampling(temperature=0.7, seed=cfg.seed + first + i) for i in active]
        answers = teacher.generate([convs[i][1:] for i in active], sampling)
        for i, a in zip(active, answers):
            convs[i].append({"role": "assistant", "content": a})
            if a is None:
                failed[i] = "teacher_failed"
    return [failed.get(i) or c[1:] for i, c in enumerate(convs)]


def run_dialogues(cfg: DialoguesConfig, tokenizer, user: Backend, teacher: Backend, out: Path,
                  topics: Sequence[str] = ()) -> dict:
    """`topics`: seed topics (UltraChat's meta-topics), cycled to n_dialogues; none: the world's."""
    if topics:
        topics = [f"{TOPIC_PREFIX}{topics[i % len(topics)]}" for i in range(cfg.n_dialogues)]
    else:
        topics = seed_topics(cfg.n_dialogues, cfg.seed)

    def make_chunk(start: int, end: int) -> tuple[list[dict], Counter]:
        rows, dropped = [], Counter()
        chunk = topics[start:end]
        for index, (topic, messages) in enumerate(zip(chunk, _make_chunk(chunk, start, cfg, user, teacher)), start):
            reason = messages if isinstance(messages, str) else _reject(messages, tokenizer, cfg.max_tokens)
            if reason:
                dropped[reason] += 1
                continue
            rows.append({"id": f"dialogue-{cfg.seed}-{index}", "messages": messages, "topic": topic,
                         "teacher": teacher.name, "user_simulator": user.name})
        return rows, dropped

    made, dropped = in_parts(len(topics), cfg.chunk_size, out, make_chunk)
    # Duplicates are dropped across the whole run, in order, once every chunk is made: a chunk
    # alone cannot know the others (they may be made at once, by other processes).
    rows, seen = [], set()
    for row in made:
        if (fingerprint := _fingerprint(row["messages"])) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(fingerprint)
            rows.append(row)
    if is_main():
        write_rows(out / "dialogues.jsonl", rows)
    return {"rows": {"kept": len(rows), "dropped": dict(dropped)}, "topics": len(topics),
            "teacher": teacher.name, "user_simulator": user.name}


def _fingerprint(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def _reject(messages: list[dict], tokenizer, max_tokens: int) -> str | None:
    if any(not m["content"].strip() for m in messages):
        return "empty_message"
    if len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]) > max_tokens:
        return "too_long"
    return None


def stage(recipe, out: Path, inputs: dict) -> dict:
    """The `dialogues` stage: read from dialogues.source, or written by roles.teacher and
    roles.user_simulator from the seed topics."""
    from dalign import roles
    from dalign.readers import read_dialogues, read_source

    cfg = recipe.dialogues
    if cfg.source is not None:
        if not is_main():  # read once: the other processes wait at the stage's barrier
            return {}
        read = read_source(cfg.source, read_dialogues, out / "dialogues.jsonl")
        return {"rows": {"kept": read["kept"], "dropped": read["dropped"]}, "source": read}
    teacher = roles.backend(recipe, "teacher", inputs, out)
    user = roles.backend(recipe, "user_simulator", inputs, out)
    facts = run_dialogues(cfg, roles.tokenizer(recipe, inputs), user, teacher, out, topics=cfg.topics)
    teacher_seed = {"teacher": recipe.roles.teacher.world.seed} if recipe.roles.teacher.world is not None else {}
    return {"seeds": {"topics": cfg.seed, **teacher_seed}, **facts, **roles.usage([teacher, user])}
