"""Random kills of the whole recipe: a small recipe run straight through, then again as a
subprocess killed with SIGKILL at seeded random moments inside every stage, and once while a
checkpoint is being written and once while a part file is, rerun after each kill until it
completes. Every output must equal the straight run's (rows, pairs, reference log-probs, every
saved model's weights, evaluation results; timings aside), and no row or step may appear twice.

Slow (about two minutes on 2 cores): `make test-slow` runs it, and `.ci/run` runs that too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# The micro recipe of test_stages, with enough rows and steps that every stage has parts or
# checkpoints to be killed among (dialogues 8 parts, completions and ratings 6, training
# stages a checkpoint every few steps).
RECIPE = """\
name: kills
run_dir: {run_dir}
base: {{corpus_documents: 300, max_steps: 20, checkpoint_every: 5, per_device_batch_size: 4, max_length: 64,
        log_every: 2, model: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, max_position: 128,
        vocab_size: 600}}}}
dialogues: {{n_dialogues: 128, chunk_size: 16}}
sft: {{max_steps: 12, checkpoint_every: 3, per_device_batch_size: 4, max_length: 128, log_every: 1}}
completions: {{n_prompts: 48, chunk_size: 8, max_new_tokens: 8}}
rating: {{chunk_size: 8}}
dpo: {{max_steps: 8, checkpoint_every: 2, per_device_batch_size: 4, max_length: 128}}
variants: [{{name: main}}, {{name: nosft, start: base}}]
evaluate: {{questions_per_category: 1, max_new_tokens: 8, pass_k: 2, win_rate_instructions: 8}}
"""
SEED = 15
POLL_S = 0.002
# What differs between two runs of the same recipe by design: wall-clock times and speeds, the
# step a killed training stage resumed from, and the work counters of the process that finished a
# stage (tokens generated, requests sent: a resumed stage does only the rest).
TIMING_KEYS = {"started", "finished", "seconds", "wall_seconds", "tokens_per_second", "elapsed", "code_version",
               "resumed_from_step", "generation", "usage"}
ROW_IDS = {"dialogues/dialogues.jsonl": "id", "completions/completions.jsonl": "prompt_id",
           "ratings/ratings.jsonl": "prompt_id", "pairs/train.jsonl": "prompt_id", "pairs/test.jsonl": "prompt_id",
           "pairs/dev.jsonl": "prompt_id"}


class Run:
    """`dalign run` as a subprocess, with the time each stage's "[name] running" line arrived."""

    def __init__(self, recipe: Path, log: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dalign.cli", "run", str(recipe)], stdout=subprocess.PIPE,
                                     stderr=log.open("a"), text=True, env=env)
        self.started: dict[str, float] = {}
        self.lines: list[float] = []  # when each line of stdout arrived
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(time.monotonic())
            if line.startswith("[") and "] running in " in line:
                self.started[line[1:line.index("]")]] = time.monotonic()

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()


def straight_run(recipe: Path, log: Path) -> dict[str, float]:
    """Run to completion; returns each stage's duration (until the next line: the next stage's,
    or the score table after the last)."""
    run = Run(recipe, log)
    assert run.proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    run.reader.join()
    order = sorted(run.started.items(), key=lambda kv: kv[1])
    ends = [min(t for t in run.lines if t > start) for _, start in order]
    return {name: end - start for (name, start), end in zip(order, ends)}


def running_stage(run_dir: Path) -> str | None:
    """The stage whose manifest says running: where a kill landed (None: between stages)."""
    for manifest in run_dir.glob("*/manifest.json"):
        if json.loads(manifest.read_text())["status"] == "running":
            return manifest.parent.name
    return None


def killed_runs(recipe: Path, run_dir: Path, durations: dict[str, float], log: Path) -> list[dict]:
    """Relaunch after every kill until a run completes. Armed triggers: one per stage (a seeded
    random moment inside it, timed from its line), one at the sight of a checkpoint being
    written (`step-N.tmp`), one at the sight of a part file being written. Each fires once."""
    rng = random.Random(SEED)
    delays = {name: rng.uniform(0.05, 0.6) * d for name, d in durations.items()}
    writing = {"checkpoint": "*/checkpoints/step-*.tmp", "part": "*/parts/.part-*.tmp"}
    kills = []
    for _ in range(len(delays) + len(writing) + 3):
        run = Run(recipe, log)
        fired = None
        while fired is None and not run.finished():
            now = time.monotonic()
            fired = next((n for n, t in list(run.started.items()) if n in delays and now >= t + delays[n]), None)
            fired = fired or next((w for w, pattern in writing.items() if any(run_dir.glob(pattern))), None)
            time.sleep(POLL_S)
        if fired is None:
            assert run.proc.returncode == 0, log.read_text()[-3000:]
            return kills
        run.kill()
        delays.pop(fired, None), writing.pop(fired, None)
        kills.append({"trigger": fired, "landed": running_stage(run_dir),
                      "left": sorted(str(p.relative_to(run_dir)) for pattern in ("*/checkpoints/step-*.tmp",
                                                                                  "*/parts/.part-*.tmp")
                                     for p in run_dir.glob(pattern))})
    pytest.fail(f"the run never completed after {len(kills)} kills: {kills}")


def outputs(run_dir: Path) -> dict[str, Path]:
    """Every output file, by path in the run directory: not the progress a stage keeps while it
    works (parts, checkpoints, temp files), the lock, or the report (it quotes timings)."""
    skipped = ("parts", "checkpoints", "report")
    return {str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not set(p.relative_to(run_dir).parts) & set(skipped)
            and not p.name.endswith(".tmp") and p.name != ".dalign.lock"}


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def content(path: Path, run_dir: Path):
    """What a file holds, with the run directory's own path (manifests name their inputs) made common."""
    if path.suffix == ".safetensors":
        return {k: v.tolist() for k, v in load_file(path).items()}
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text().replace(str(run_dir), "RUN_DIR")
        if path.suffix == ".json":
            return without_timings(json.loads(text))
        return [without_timings(json.loads(line)) for line in text.splitlines()]
    return path.read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kills")
    for name in ("straight", "killed"):
        (folder / f"{name}.yaml").write_text(RECIPE.format(run_dir=folder / name))
    durations = straight_run(folder / "straight.yaml", folder / "straight.log")
    kills = killed_runs(folder / "killed.yaml", folder / "killed", durations, folder / "killed.log")
    return folder / "straight", folder / "killed", durations, kills


def test_kills_landed_inside_every_stage_and_mid_checkpoint(runs):
    _, _, durations, kills = runs
    print("kills:", json.dumps(kills, indent=1))
    assert len(kills) >= 8
    assert set(durations) <= {k["landed"] for k in kills}, kills  # a kill inside each of the nine stages
    # A checkpoint folder left half written proves a kill while a checkpoint was being saved.
    assert any(p.split("/")[1] == "checkpoints" for k in kills for p in k["left"]), kills


def test_a_killed_and_rerun_recipe_gives_the_straight_runs_outputs(runs):
    straight, killed, _, _ = runs
    a, b = outputs(straight), outputs(killed)
    assert sorted(a) == sorted(b)
    assert any(name.endswith("reference_logps.json") for name in a) and sum(n.endswith(".safetensors") for n in a) >= 4
    for name in a:
        assert content(a[name], straight) == content(b[name], killed), name


def test_no_row_or_training_step_appears_twice_and_no_temp_file_is_left(runs):
    _, killed, _, kills = runs
    assert any(k["left"] for k in kills)  # the kills left half-written files; the reruns cleared them
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]
    for name, key in ROW_IDS.items():
        ids = [json.loads(line)[key] for line in (killed / name).read_text().splitlines()]
        assert ids and len(ids) == len(set(ids)), name
    for metrics in killed.glob("*/metrics.jsonl"):
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert steps == sorted(set(steps)), metrics
