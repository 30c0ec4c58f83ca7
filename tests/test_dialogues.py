"""Dialogue generation (stage 1a): valid rows, drops counted by reason, and a run that is
killed midway resumes to exactly the rows of an uninterrupted run, none twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dalign.chat import render
from dalign.config import DialoguesConfig
from dalign.data import read_rows, validate_dialogue
from dalign.generate import run_dialogues
from dalign.world.roles import WorldTeacher, WorldUser, seed_topics

REPO = Path(__file__).resolve().parent.parent
CFG = DialoguesConfig(n_dialogues=60, chunk_size=8, max_turns=3)
N_PARTS = 8  # ceil(60 / 8)


def n_tokens(tokenizer, row: dict) -> int:
    return len(tokenizer(render(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def full_run(world_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("dialogues") / "full"
    summary = run_dialogues(CFG, world_tokenizer, WorldUser(seed=CFG.seed), WorldTeacher(), out)
    return out, summary, read_rows(out / "dialogues.jsonl")


def test_rows_are_valid_unique_and_accounted_for(full_run):
    out, summary, rows = full_run
    kept, dropped = summary["rows"]["kept"], summary["rows"]["dropped"]
    assert kept == len(rows) > 0
    assert kept + sum(dropped.values()) == CFG.n_dialogues == summary["topics"]
    assert summary["teacher"] == "world-teacher" and summary["user_simulator"] == "world-user"
    for row in rows:
        validate_dialogue(row)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    topics = seed_topics(CFG.n_dialogues, CFG.seed)
    for row in rows:
        index = int(row["id"].rsplit("-", 1)[1])
        assert row["id"] == f"dialogue-{CFG.seed}-{index}" and row["topic"] == topics[index]
        assert row["teacher"] == "world-teacher" and row["user_simulator"] == "world-user"
        # No system prompt in the data: the simulator's topic prompt is not part of the dialogue.
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert CFG.min_turns <= len(roles) // 2 <= CFG.max_turns
    assert len({len(r["messages"]) for r in rows}) > 1  # dialogues of several lengths
    # One part file per chunk, and dialogues.jsonl is their concatenation in order.
    parts = sorted((out / "parts").glob("part-*.jsonl"))
    assert len(parts) == N_PARTS
    assert [r for p in parts for r in read_rows(p)] == rows
    assert [int(r["id"].rsplit("-", 1)[1]) for r in rows] == sorted(int(r["id"].rsplit("-", 1)[1]) for r in rows)


def test_teacher_answers_the_dialogue_without_the_topic_prompt(full_run):
    _, _, rows = full_run
    teacher = WorldTeacher()
    for row in rows[:10]:
        msgs = row["messages"]
        for i in range(1, len(msgs), 2):
            assert msgs[i]["content"] == teacher.answer(msgs[:i])


def test_over_long_dialogues_are_dropped_and_counted(world_tokenizer, full_run, tmp_path):
    _, full_summary, full_rows = full_run
    assert "too_long" not in full_summary["rows"]["dropped"]
    short = CFG.model_copy(update={"max_tokens": 40})
    summary = run_dialogues(short, world_tokenizer, WorldUser(seed=CFG.seed), WorldTeacher(), tmp_path / "short")
    rows = read_rows(tmp_path / "short" / "dialogues.jsonl")
    dropped = summary["rows"]["dropped"]
    assert summary["rows"]["kept"] == len(rows) > 0
    assert dropped["too_long"] > 0
    assert summary["rows"]["kept"] + sum(dropped.values()) == CFG.n_dialogues
    assert all(n_tokens(world_tokenizer, r) <= 40 for r in rows)
    # Exactly the short dialogues of the full run are kept.
    assert rows == [r for r in full_rows if n_tokens(world_tokenizer, r) <= 40]
    assert dropped["too_long"] == sum(n_tokens(world_tokenizer, r) > 40 for r in full_rows)


class SameQuestion:
    """A user simulator that asks one question whatever the topic: every dialogue is the same."""

    name = "same-question"

    def generate(self, conversations, sampling=None):
        return ["What is 3 plus 4?"] * len(conversations)


class SometimesSilent(WorldTeacher):
    """Answers nothing for every third conversation of a batch."""

    def generate(self, conversations, sampling=None):
        return ["" if i % 3 == 0 else self.answer(c) for i, c in enumerate(conversations)]


def test_empty_and_duplicate_dialogues_are_dropped_even_across_a_resume(world_tokenizer, tmp_path):
    cfg = DialoguesConfig(n_dialogues=16, chunk_size=8, min_turns=1, max_turns=1)
    out = tmp_path / "dups"
    summary = run_dialogues(cfg, world_tokenizer, SameQuestion(), SometimesSilent(), out)
    # Per chunk of 8, conversations 0, 3 and 6 are empty; the other 10 are one dialogue.
    assert summary["rows"] == {"kept": 1, "dropped": {"empty_message": 6, "duplicate": 9}}
    rows = read_rows(out / "dialogues.jsonl")
    assert [r["id"] for r in rows] == ["dialogue-0-1"]
    # Chunk 2 is redone; the dialogue kept in chunk 1 must still count as seen.
    (out / "parts" / "part-00001.jsonl").unlink()
    again = run_dialogues(cfg, world_tokenizer, SameQuestion(), SometimesSilent(), out)
    assert again == summary
    assert read_rows(out / "dialogues.jsonl") == rows


def test_a_chunk_with_stats_but_no_part_file_is_redone(world_tokenizer, full_run, tmp_path):
    """Killed between writing a chunk's stats and its part file: the chunk is made again."""
    src, summary, rows = full_run
    out = tmp_path / "partial"
    (out / "parts").mkdir(parents=True)
    for k in (0, 1, 2):
        for suffix in (".jsonl", ".stats.json"):
            name = f"part-{k:05d}{suffix}"
            (out / "parts" / name).write_bytes((src / "parts" / name).read_bytes())
    (out / "parts" / "part-00002.jsonl").unlink()  # stats written, part not yet
    (out / "parts" / "part-00003.stats.json").write_text(json.dumps({"too_long": 8}))  # a stale stats alone
    again = run_dialogues(CFG, world_tokenizer, WorldUser(seed=CFG.seed), WorldTeacher(), out)
    assert again == summary
    assert read_rows(out / "dialogues.jsonl") == rows


SCRIPT = """
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from dalign.config import DialoguesConfig
from dalign.generate import run_dialogues
from dalign.world.roles import WorldTeacher, WorldUser

tokenizer_dir, out, delay, cfg = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])

class SlowTeacher(WorldTeacher):
    def generate(self, conversations, sampling=None):
        time.sleep(delay)
        return [self.answer(c) for c in conversations]

cfg = DialoguesConfig(**cfg)
run_dialogues(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), WorldUser(seed=cfg.seed), SlowTeacher(), out)
print("finished")
"""


def _start(script: Path, tok_dir: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), str(tok_dir), str(out), str(delay), CFG.model_dump_json()],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_generation_resumes_to_the_same_rows(world_tokenizer, full_run, tmp_path):
    _, full_summary, full_rows = full_run
    tok_dir = tmp_path / "tokenizer"
    world_tokenizer.save_pretrained(tok_dir)
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed"

    proc = _start(script, tok_dir, out, delay=0.3)
    try:
        deadline = time.monotonic() + 90
        while len(list((out / "parts").glob("part-*.jsonl"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"generation ended before it could be killed: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("no part files after 90 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = sorted((out / "parts").glob("part-*.jsonl"))
    assert 2 <= len(done_before) < N_PARTS, "the run must have been stopped midway"
    assert not (out / "dialogues.jsonl").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in done_before}

    proc = _start(script, tok_dir, out, delay=0.0)  # the rerun, to completion
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "finished" in stdout

    rows = read_rows(out / "dialogues.jsonl")
    assert rows == full_rows
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert len(list((out / "parts").glob("part-*.jsonl"))) == N_PARTS
    # It resumed: the chunks finished before the kill were read back, not made again.
    assert {p.name: (out / "parts" / p.name).stat().st_mtime_ns for p in done_before} == stamps
    # The summary of the resumed run still counts the drops of the parts made before the kill.
    summary = run_dialogues(CFG, world_tokenizer, WorldUser(seed=CFG.seed), WorldTeacher(), out)
    assert summary == full_summary
