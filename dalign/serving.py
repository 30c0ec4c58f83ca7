"""Servers dalign starts itself: a role or ensemble member that says `serve:` gets an
OpenAI-compatible server (vLLM by default) on the named model for the length of one stage.

The server is started on a free port of 127.0.0.1, in its own process group, with its output
in the stage folder (`serve-<name>.log`) and its process id in `serve-<name>.json`. The stage
waits for its health check, sends its requests through the OpenAI backend, and the server's
whole process group is stopped when the stage ends or fails. SIGTERM sent to dalign is turned
into an exit that runs the same stop; if dalign dies without cleaning up (SIGKILL), the
server's first process is sent SIGTERM by the kernel (PR_SET_PDEATHSIG, Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dalign.config import OpenAIConfig, ServeConfig
from dalign.openai_backend import OpenAIBackend

_STAGE: contextlib.ExitStack | None = None  # the servers of the stage now running


class ServeError(RuntimeError):
    """A served model that could not be started or did not come up; the message has its log's tail."""


@contextlib.contextmanager
def stage_servers():
    """The scope of one stage: every server started in it is stopped when it ends, however it ends."""
    global _STAGE
    with contextlib.ExitStack() as stack:
        _STAGE = stack
        try:
            yield
        finally:
            _STAGE = None


def start(spec: ServeConfig, model: str, out: Path, name: str) -> OpenAIBackend:
    """Start a server on `model` for the current stage and return the backend that talks to it."""
    if _STAGE is None:
        raise RuntimeError("a served model is started inside a stage (dalign.run.run_stage)")
    port = _STAGE.enter_context(_server(spec, model, out, name))
    config = OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", model=model, api_key_env=None,
                          max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s, max_retries=spec.max_retries)
    # The port changes from run to run; the cache keys name the model instead, so a rerun asks nothing twice.
    return OpenAIBackend.for_stage(config, out, name, cache_identity=f"served:{model}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM if dalign dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _server(spec: ServeConfig, model: str, out: Path, name: str):
    port = _free_port()
    argv = shlex.split(spec.command.format(model=shlex.quote(model), port=port))
    out.mkdir(parents=True, exist_ok=True)
    log_path, info_path = out / f"serve-{name}.log", out / f"serve-{name}.json"
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as err:
            raise ServeError(f"cannot start the server for {name} ({argv[0]}): {err}") from None
    info = {"name": name, "model": model, "command": argv, "port": port, "pid": proc.pid}
    info_path.write_text(json.dumps(info, indent=1))
    with _stop_on_sigterm():
        try:
            _wait_healthy(proc, port, spec, log_path)
            print(f"[serve] {name}: {argv[0]} on {model} at port {port} (pid {proc.pid})")
            yield port
        finally:
            info["returncode"] = _stop(proc)
            info_path.write_text(json.dumps(info, indent=1))


def _wait_healthy(proc: subprocess.Popen, port: int, spec: ServeConfig, log_path: Path) -> None:
    deadline = time.monotonic() + spec.startup_timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{spec.health_path}", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {spec.startup_timeout_s:g} s"
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServeError(f"the server {' '.join(spec.command.split()[:2])} {why}; the end of {log_path}:\n{tail}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM to the server's process group (vLLM has workers), SIGKILL after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM raises SystemExit while a server runs, so the stop in `finally` runs too (Python's
    default on SIGTERM is to die at once). Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_cleanly(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
