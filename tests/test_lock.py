"""One run directory, one writer, tested with real processes: a second `dalign run` on a
directory in use is refused naming the first's process id, and a lock left by a process
killed with SIGKILL is taken over by the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dalign.lock import LOCK_NAME, RunLock, RunLockError

# The micro recipe of test_stages, enough for its first stage to take some seconds.
RECIPE = """\
name: locked
run_dir: {run_dir}
base: {{corpus_documents: 300, max_steps: 400, per_device_batch_size: 4, max_length: 64, log_every: 2,
        model: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, max_position: 128, vocab_size: 600}}}}
"""
HOLD = "import sys, time; from dalign.lock import RunLock; held = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def dalign(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dalign.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def wait_for_holder(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads((run_dir / LOCK_NAME).read_text())
            if holder.get("pid") == proc.pid:
                return holder
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("the first run never took the lock")


def test_a_second_run_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(run_dir=run_dir))
    first = dalign("run", str(recipe))
    try:
        wait_for_holder(run_dir, first)
        second = dalign("run", str(recipe))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"in use by dalign process {first.pid}" in err and str(run_dir) in err
        assert first.poll() is None  # the refused run left the first alone
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    # The killed run's file still names it; the next run takes the lock and says whose it was.
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid
    taker = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert f"took over {run_dir / LOCK_NAME}, left by process {first.pid}" in taker.stdout.readline()
        assert taker.stdout.readline().strip() == "held"
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        assert holder["pid"] == taker.pid
        with pytest.raises(RunLockError, match=f"process {taker.pid}"):
            RunLock(run_dir).acquire()
    finally:
        taker.kill()
        taker.communicate()


def test_a_released_lock_is_free_and_reports_no_previous_holder(tmp_path, capsys):
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    again = RunLock(tmp_path).acquire()
    assert again.previous is None and "took over" not in capsys.readouterr().out
    again.release()
