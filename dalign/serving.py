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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from dalign.backends import Conversation, Sampling, Samplings, per_row
from dalign.config import OpenAIConfig, ServeConfig
from dalign.openai_backend import OpenAIBackend
from dalign.parallel import sum_numbers

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


def start(spec: ServeConfig, model: str, out: Path, name: str):
    """Start `spec.data_parallel` servers on `model` for the current stage (all at once, then
    waited for) and return the backend that talks to them: one OpenAI backend, or rows spread
    over several."""
    if _STAGE is None:
        raise RuntimeError("a served model is started inside a stage (dalign.run.run_stage)")
    _STAGE.enter_context(_stop_on_sigterm())
    # Under a launch each rank serves from its own GPUs: server j of local rank r on GPU r * n + j.
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    n, servers = spec.data_parallel, []
    for j in range(n):
        gpu = {} if (n == 1 and local_world == 1) or "CUDA_VISIBLE_DEVICES" in spec.env else \
            {"CUDA_VISIBLE_DEVICES": str(local_rank * n + j)}
        servers.append(_launch(spec, model, out, name if n == 1 else f"{name}-{j}", gpu))
    backends = []
    for label, proc, port, log_path in servers:
        wait_healthy(proc, f"http://127.0.0.1:{port}{spec.health_path}", spec.startup_timeout_s, log_path,
                     " ".join(spec.command.split()[:2]))
        print(f"[serve] {label}: {spec.command.split()[0]} on {model} at port {port} (pid {proc.pid})")
        config = OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", model=model, api_key_env=None,
                              max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
                              max_retries=spec.max_retries)
        # The port changes from run to run; the cache keys name the model instead, so a rerun asks
        # nothing twice, whichever server answered first.
        backends.append(OpenAIBackend.for_stage(config, out, name, cache_identity=f"served:{model}"))
    return backends[0] if n == 1 else Spread(backends, name)


class Spread:
    """Rows spread over several servers of the same model: row i of a batch to server i % n, all
    servers asked at once."""

    def __init__(self, backends: list[OpenAIBackend], name: str):
        self.backends, self.name = backends, name

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str | None]:
        samplings, n = per_row(sampling, len(conversations)), len(self.backends)
        replies: list[str | None] = [None] * len(conversations)

        def ask(j: int) -> None:
            rows = range(j, len(conversations), n)
            texts = self.backends[j].generate([conversations[i] for i in rows], [samplings[i] for i in rows])
            for i, text in zip(rows, texts):
                replies[i] = text

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(ask, range(n)))
        return replies

    def usage(self) -> dict:
        """The servers' counts summed, with each server's requests."""
        shares = [b.usage() for b in self.backends]
        total = sum_numbers(shares)
        return {**total, "backend": self.name, "base_url": [s["base_url"] for s in shares],
                "requests_per_server": [s["requests"] for s in shares]}


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM if dalign dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _launch(spec: ServeConfig, model: str, out: Path, name: str, gpu: dict) -> tuple:
    """Start one server; its stop is registered with the stage. Returns (name, process, port, log)."""
    port = free_port()
    argv = shlex.split(spec.command.format(model=shlex.quote(model), port=port))
    out.mkdir(parents=True, exist_ok=True)
    log_path, info_path = out / f"serve-{name}.log", out / f"serve-{name}.json"
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **gpu, **spec.env},
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as err:
            raise ServeError(f"cannot start the server for {name} ({argv[0]}): {err}") from None
    info = {"name": name, "model": model, "command": argv, "port": port, "pid": proc.pid, **gpu}
    info_path.write_text(json.dumps(info, indent=1))

    def stop() -> None:
        info["returncode"] = _stop(proc)
        info_path.write_text(json.dumps(info, indent=1))

    _STAGE.callback(stop)
    return name, proc, port, log_path


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path, what: str) -> None:
    """Poll the server's health `url` until it answers 200; a server that exits or stays unhealthy
    for `timeout_s` is a ServeError with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {timeout_s:g} s"
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServeError(f"the server {what} {why}; the end of {log_path}:\n{tail}")
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
