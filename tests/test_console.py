"""What a run prints, and `dalign status`: one bar and one summary line per stage, no library
chatter, and each stage's state read back from the run's files."""

from __future__ import annotations

import json
import os
import shutil
import socket

from dalign.cli import main
from dalign.console import Progress, rows_text
from dalign.run import plan
from dalign.recipe import load_recipe


def test_away_from_a_terminal_the_bar_is_ten_plain_lines(capsys):
    with Progress("ratings", 200, "rows", initial=40, every=0) as bar:
        for _ in range(16):
            bar.postfix(loss=0.5)
            bar.update(10)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "[ratings] resuming at 40/200 rows"
    counts = [line.split()[1] for line in lines[1:]]
    assert counts == ["60/200", "80/200", "100/200", "120/200", "140/200", "160/200", "180/200", "200/200"]
    assert "\r" not in err and "loss 0.500" in lines[1] and "(100%)" in lines[-1]
    with Progress("pairs", 200, "rows") as bar:  # a fast stage: its last line only, not ten in a second
        for _ in range(20):
            bar.update(10)
    assert capsys.readouterr().err.splitlines() == ["[pairs] 200/200 rows (100%) in 0 s"]


def test_a_run_prints_a_summary_line_per_stage_and_no_loading_bars(micro_run):
    path, run_dir, code, out, err = micro_run
    assert code == 0, err
    for name in plan(load_recipe(path)):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        summary = next(line for line in out.splitlines() if line.startswith(f"[{name}] done: "))
        assert rows_text(manifest) .split(" (")[0] in summary
        if "steps" in manifest:
            assert f"{manifest['steps']} steps" in summary and "loss " in summary
    for chatter in ("Loading weights", "Removed shared tensor", "\r"):
        assert chatter not in out + err
    assert f"report: {run_dir / 'report' / 'report.md'}" in out


def test_status_reads_each_stages_state_rows_and_time(micro_run, tmp_path, capsys):
    path, run_dir, code, _, _ = micro_run
    names = list(plan(load_recipe(path)))
    assert main(["status", str(run_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "no dalign process running" in table[0]
    rows = {line.split()[0]: line for line in table[3:]}
    assert list(rows) == names  # every planned stage, in the plan's order
    for name in names:
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert rows[name].split()[1] == "complete" and rows_text(manifest) in rows[name]
    # A copy of the run: the last stage killed mid-way, then one not started.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    plan_file = copy / "plan.json"
    plan_file.write_text(plan_file.read_text().replace(str(run_dir), str(copy)))
    manifest_path = copy / "evaluate" / "manifest.json"
    manifest_path.write_text(json.dumps({"stage": "evaluate", "status": "running", "started": "2026-12-02T10:00:00"}))
    shutil.rmtree(copy / "dpo-nosft")
    (copy / ".dalign.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    assert main(["status", str(copy)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert "interrupted" in rows["evaluate"] and "started 2026-12-02 10:00:00" in rows["evaluate"]
    assert "not started" in rows["dpo-nosft"] and rows["sft"].split()[1] == "complete"
    # The lock held by a live process (this one): the stage is running.
    (copy / ".dalign.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "t0"}))
    assert main(["status", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"in use by dalign process {os.getpid()}" in out and " running " in out.splitlines()[-1] + " "
    assert main(["status", str(tmp_path / "nowhere")]) == 2


def _dead_pid() -> int:
    """A process id no process has: a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
