"""`dalign status RUN_DIR`: each stage's state, rows and time, read from the run's files alone.

`dalign run` writes the plan (`plan.json`: every stage of every seed's run, and the folder
holding it) when it starts, so that stages not started yet can be listed too. A stage whose
manifest says running is `running` while a dalign process holds the run's lock, and
`interrupted` once none does (a rerun resumes it).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from dalign.console import duration, manifest_seconds, rows_text
from dalign.lock import LOCK_NAME

PLAN_NAME = "plan.json"


def write_plan(run_dir: str | Path, runs: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """runs: each seed's run folder and its stages as (name, folder holding the stage)."""
    from dalign.data import write_json

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / PLAN_NAME, {"runs": [{"run_dir": r, "stages": [list(s) for s in stages]}
                                                    for r, stages in runs]}, indent=1)


def lock_held(run_dir: Path) -> dict | None:
    """The holder of the run's lock (pid, host, started) while that process is alive, else None.
    Read, not locked: taking the lock even briefly could make a run starting that moment refuse."""
    path = run_dir / LOCK_NAME
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return None
    if not holder.get("pid") or holder.get("host") != socket.gethostname():
        return holder or None  # another host's process cannot be checked from here: trust the file
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return None  # killed: the file still names it (a released lock empties the file)
    except PermissionError:
        pass  # alive, another user's
    return holder


def _stages(run_dir: Path) -> list[tuple[str, Path]]:
    """Every planned stage as (its folder relative to the run directory, the folder), once each
    (the seeds' runs share their base stages)."""
    plan = run_dir / PLAN_NAME
    if plan.exists():
        folders = [Path(root) / name for r in json.loads(plan.read_text())["runs"] for name, root in r["stages"]]
    else:  # a run made before plans were written: the folders that hold a manifest
        found = [m for m in run_dir.glob("**/manifest.json") if "checkpoints" not in m.parts]
        folders = [m.parent for m in sorted(found, key=lambda m: json.loads(m.read_text()).get("started", ""))]
    named = {}
    for folder in folders:
        try:
            named.setdefault(str(folder.resolve().relative_to(run_dir.resolve())), folder)
        except ValueError:  # a shared folder outside the run directory
            named.setdefault(str(folder), folder)
    return list(named.items())


def _progress(stage_dir: Path) -> str:
    """How far a running stage got: its last logged training step, or its part files."""
    log = stage_dir / "metrics.jsonl"
    if log.exists() and (lines := log.read_text().splitlines()):
        return f"step {json.loads(lines[-1])['step']} logged"
    parts = list((stage_dir / "parts").glob("part-*.jsonl"))
    return f"{len(parts)} parts written" if parts else ""


def status_table(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    holder = lock_held(run_dir)
    lines = [f"{run_dir}: " + (f"in use by dalign process {holder.get('pid')} on {holder.get('host')} since "
                               f"{holder.get('started')}" if holder is not None else "no dalign process running"),
             ""]
    table = [("stage", "state", "rows", "time")]
    for name, folder in _stages(run_dir):
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else None
        if manifest is None:
            state, rows, time = "not started", "", ""
        elif manifest.get("status") == "complete":
            seconds = manifest_seconds(manifest)
            state, rows, time = "complete", rows_text(manifest), duration(seconds) if seconds is not None else ""
        else:
            state = "running" if holder is not None else "interrupted (a rerun resumes it)"
            rows, time = _progress(folder), f"started {manifest.get('started', '?').replace('T', ' ')}"
        table.append((name, state, rows, time))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
