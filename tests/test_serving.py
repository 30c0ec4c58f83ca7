"""`serve:`: an ensemble member served by a server dalign starts itself on this run's dSFT model
(`transformers serve` here, vLLM on a GPU). The server starts, answers the completions stage
through the OpenAI backend, and is gone when the stage ends, and when the stage is sent SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from transformers import GenerationConfig

from dalign.cli import main
from dalign.pretrain import build_model
from test_dpo import TINY
from test_real_server import CLI

pytestmark = pytest.mark.skipif(not CLI.exists(), reason="the `transformers serve` command is not installed")


def gone(pid: int, wait_s: float = 0.0) -> bool:
    """No such process, or only its zombie (a server whose parent died is reaped by init, if ever)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


@pytest.fixture(scope="module")
def trained(world_tokenizer, tmp_path_factory):
    """A recipe on a tiny folder model whose dialogues and dSFT are done; a completions member is
    the dSFT model served by `transformers serve`."""
    root = tmp_path_factory.mktemp("serving")
    model = build_model(TINY, world_tokenizer, seed=0)
    model.generation_config = GenerationConfig(eos_token_id=world_tokenizer.eos_token_id,
                                               pad_token_id=world_tokenizer.pad_token_id)
    model.save_pretrained(root / "start")
    world_tokenizer.save_pretrained(root / "start")
    (root / "hf" / "hub").mkdir(parents=True)  # transformers serve lists models from the hub cache
    served = {"model": "sft", "command": f"{CLI} serve {{model}} --host 127.0.0.1 --port {{port}}",
              "env": {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1"},
              "startup_timeout_s": 180, "max_concurrency": 1}
    tree = {"run_dir": str(root / "run"), "start": str(root / "start"),
            "dialogues": {"n_dialogues": 16, "chunk_size": 8}, "sft": {"max_steps": 2, "per_device_batch_size": 4},
            "completions": {"n_prompts": 8, "per_prompt": 2, "max_new_tokens": 4, "chunk_size": 4,
                            "members": [{"name": "served", "serve": served}, {"name": "start", "model": "start"}]}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    for step in (["generate", "dialogues"], ["sft"]):
        assert main([*step, str(path)]) == 0
    return path, root / "run"


def test_a_served_member_answers_and_its_server_is_gone_after_the_stage(trained):
    path, run = trained
    assert main(["generate", "completions", str(path)]) == 0
    info = json.loads((run / "completions" / "serve-served.json").read_text())
    assert info["model"] == str(run / "sft" / "model") and "returncode" in info
    assert gone(info["pid"])
    manifest = json.loads((run / "completions" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["completions_per_member"]["served"] == 8
    assert manifest["usage"]["served"]["requests"] == 8 and manifest["usage"]["served"]["failures"] == 0
    rows = [json.loads(x) for x in (run / "completions" / "completions.jsonl").read_text().splitlines()]
    assert all(isinstance(c["text"], str) for r in rows for c in r["completions"] if c["model"] == "served")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stage_killed_stops_its_server(trained, tmp_path, sig):
    """SIGTERM: dalign stops the server before it exits. SIGKILL: dalign cannot, and the kernel
    sends the server SIGTERM as its parent dies (PR_SET_PDEATHSIG)."""
    path, run = trained
    long = tmp_path / "long.yaml"  # enough requests, one at a time, that the stage is still running when signalled
    tree = yaml.safe_load(path.read_text())
    tree["completions"].update({"n_prompts": 400, "max_new_tokens": 32, "chunk_size": 50})
    long.write_text(yaml.safe_dump(tree))
    stage = run / "completions"
    subprocess.run(["rm", "-rf", str(stage)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dalign.cli", "generate", "completions", str(long)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    info_path, deadline = stage / "serve-served.json", time.monotonic() + 240
    while not _healthy(info_path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.5)
    time.sleep(2)  # a few requests answered
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    info = json.loads(info_path.read_text())
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
        assert gone(info["pid"]) and "returncode" in info  # stopped and waited for before dalign exited
    else:
        assert proc.returncode == -signal.SIGKILL
        assert gone(info["pid"], wait_s=60)
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"  # resumable, not complete


def _healthy(info_path: Path) -> bool:
    if not info_path.exists():
        return False
    port = json.loads(info_path.read_text())["port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_a_data_parallel_member_spreads_its_rows_over_its_servers(trained, tmp_path):
    path, run = trained
    two = tmp_path / "two.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["completions"]["members"][0]["serve"]["data_parallel"] = 2
    two.write_text(yaml.safe_dump(tree))
    subprocess.run(["rm", "-rf", str(run / "completions")], check=True)
    assert main(["generate", "completions", str(two)]) == 0
    infos = [json.loads((run / "completions" / f"serve-served-{j}.json").read_text()) for j in (0, 1)]
    assert [i["CUDA_VISIBLE_DEVICES"] for i in infos] == ["0", "1"]  # one GPU each, where there are GPUs
    assert len({i["port"] for i in infos}) == 2 and all(gone(i["pid"]) for i in infos)
    usage = json.loads((run / "completions" / "manifest.json").read_text())["usage"]["served"]
    assert usage["requests"] == 8 and usage["requests_per_server"] == [4, 4]  # rows i % 2 to server i % 2
