"""Stage folders and their manifests: provenance next to every output, and skip-if-complete."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import dalign
from dalign.data import write_json


def code_version() -> str:
    """The git commit of the dalign checkout (with '+dirty' for local changes), else the package version."""
    root = Path(dalign.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dalign"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"dalign {dalign.__version__}"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class StageDirError(RuntimeError):
    """A stage folder that holds the output of a different configuration."""


class Stage:
    """A stage's folder. `done()` tells whether a rerun may skip it; `finish()` records provenance."""

    def __init__(self, run_dir: str | Path, name: str, config: dict):
        self.dir = Path(run_dir) / name
        self.name, self.config = name, config
        self.path = self.dir / "manifest.json"

    def read(self) -> dict | None:
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def done(self) -> bool:
        manifest = self.read()
        if manifest is None:
            return False
        if manifest.get("config_hash") != config_hash(self.config):
            raise StageDirError(f"{self.dir} was made with another configuration of stage {self.name}; "
                                f"use a new run_dir, or delete that folder to redo the stage")
        return manifest.get("status") == "complete"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.read() is None:
            self._write({"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            self.done()  # refuses to resume a folder made with another configuration

    def finish(self, **facts) -> dict:
        manifest = {**(self.read() or {}), **facts, "status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write(manifest)
        return manifest

    def _write(self, extra: dict) -> None:
        manifest = {"stage": self.name, "config": self.config, "config_hash": config_hash(self.config),
                    "code_version": code_version(), "python": sys.version.split()[0], **extra}
        write_json(self.path, manifest, indent=2, default=str)
