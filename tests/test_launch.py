"""The `dalign` command under a multi-process launch, as users start it:
`torchrun --nproc_per_node 2 -m dalign.cli sft RECIPE` and
`accelerate launch --config_file configs/accelerate/ddp.yaml -m dalign.cli dpo RECIPE`, on the
micro recipe of tests/test_stages.py; and what a launch refuses before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dalign.cli import main
from test_stages import write_recipe

ROOT = Path(__file__).resolve().parent.parent
TWO = ["sft.global_batch_size=8", "sft.per_device_batch_size=2", "dpo.global_batch_size=4",
       "dpo.per_device_batch_size=1"]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory):
    """The micro recipe with its training stages launched on two processes and the rest in this one."""
    folder = tmp_path_factory.mktemp("launch")
    run_dir = folder / "run"
    recipe = str(write_recipe(folder, run_dir))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dalign.cli"]
    launched([*torchrun, "pretrain", recipe, *TWO])
    assert main(["generate", "dialogues", recipe, *TWO]) == 0
    sft = launched([*torchrun, "sft", recipe, *TWO])
    for stage in (["generate", "completions"], ["rate"], ["binarize"]):
        assert main([*stage, recipe, *TWO]) == 0
    dpo = launched([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                    "--main_process_port", str(free_port()), "-m", "dalign.cli", "dpo", recipe, *TWO])
    return recipe, run_dir, sft, dpo


def test_torchrun_runs_pretraining_and_sft_on_two_processes(launched_run):
    recipe, run_dir, sft, _ = launched_run
    base = manifest(run_dir, "base")  # rank 0 made the tokenizer and the token stream, both trained
    assert (base["processes"], base["global_batch_size"], base["status"]) == (2, 8, "complete")
    assert AutoModelForCausalLM.from_pretrained(run_dir / "base" / "model").num_parameters() == base["parameters"]
    facts = manifest(run_dir, "sft")
    assert facts["status"] == "complete"
    assert (facts["processes"], facts["global_batch_size"], facts["per_device_batch_size"],
            facts["gradient_accumulation"], facts["engine"]) == (2, 8, 2, 2, "ddp")
    assert sft.stdout.count("[sft] running in") == 1  # rank 0 alone speaks and writes
    steps = [json.loads(line)["step"] for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, facts["steps"] + 1))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    assert model.num_parameters() == manifest(run_dir, "base")["parameters"]


def test_accelerate_launch_runs_every_dpo_variant_on_two_processes(launched_run):
    recipe, run_dir, _, dpo = launched_run
    for variant in ("dpo-main", "dpo-nosft"):
        facts = manifest(run_dir, variant)
        assert (facts["processes"], facts["global_batch_size"], facts["gradient_accumulation"]) == (2, 4, 2)
        cache = json.loads((run_dir / variant / "reference_logps.json").read_text())
        assert len(cache["logps"]) == facts["rows"]["kept"]  # both processes' shares, gathered once
        assert dpo.stdout.count(f"[{variant}] running in") == 1
    assert main(["evaluate", "mt-bench", recipe, *TWO]) == 0  # the launched stages feed the next as usual


def test_a_stage_that_does_not_split_its_rows_is_refused_under_a_launch(tmp_path, monkeypatch, capsys):
    recipe = str(write_recipe(tmp_path, tmp_path / "run"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process
    assert main(["generate", "completions", recipe]) == 2
    assert "stage completions runs in one process" in capsys.readouterr().err
    assert main(["run", recipe]) == 2  # the whole recipe holds such stages: refused before the first
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_global_batch_the_processes_cannot_split_is_refused_before_any_work(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path, tmp_path / "run"))
    # The micro recipe's dSFT has 4 rows per device: 6 is no whole number of them.
    assert main(["run", recipe, "sft.global_batch_size=6"]) == 2
    err = capsys.readouterr().err
    assert "sft.global_batch_size 6" in err and "per_device_batch_size 4 x 1 processes = 4" in err and "1.5" in err
    assert not (tmp_path / "run").exists()  # not even the base model was trained


def test_global_batch_and_accumulation_are_not_both_set(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path, tmp_path / "run"))
    assert main(["run", recipe, "sft.global_batch_size=8", "sft.gradient_accumulation=2"]) == 2
    assert "set global_batch_size or gradient_accumulation, not both" in capsys.readouterr().err
