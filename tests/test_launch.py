"""The `dalign` command under a multi-process launch, as users start it:
`torchrun --nproc_per_node 2 -m dalign.cli sft RECIPE` and
`accelerate launch --config_file configs/accelerate/ddp.yaml -m dalign.cli dpo RECIPE`, on the
micro recipe of tests/test_stages.py; every generating stage under torchrun writing what one
process writes, also after a rank is killed and one process resumes; and what a launch
refuses before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dalign.cli import main
from dalign.serving import free_port
from micro import write_recipe

ROOT = Path(__file__).resolve().parent.parent
TWO = ["sft.global_batch_size=8", "sft.per_device_batch_size=2", "dpo.global_batch_size=4",
       "dpo.per_device_batch_size=1"]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


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
    one = [sys.executable, "-m", "dalign.cli"]  # fresh processes: no state left by earlier tests in this one
    launched([*torchrun, "pretrain", recipe, *TWO])
    launched([*one, "generate", "dialogues", recipe, *TWO])
    sft = launched([*torchrun, "sft", recipe, *TWO])
    for stage in (["generate", "completions"], ["rate"], ["binarize"]):
        launched([*one, *stage, recipe, *TWO])
    dpo = launched([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                    "--main_process_port", str(free_port()), "-m", "dalign.cli", "dpo", recipe, *TWO])
    launched([*one, "evaluate", "mt-bench", recipe, *TWO])  # the launched stages feed the next as usual
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


GENERATED = ("dialogues", "completions", "ratings", "pairs", "evaluate")


def generated_outputs(run_dir: Path) -> dict[str, object]:
    """Every row file the generating stages wrote, and the evaluation's files without their timings."""
    found = {}
    for stage in GENERATED:
        for path in sorted((run_dir / stage).glob("*.json*")):
            if path.name == "manifest.json" or path.name.startswith("."):  # a killed write's temp file
                continue
            if path.suffix == ".jsonl":
                found[f"{stage}/{path.name}"] = [json.loads(x) for x in path.read_text().splitlines()]
            else:
                content = json.loads(path.read_text())
                if isinstance(content, dict):
                    content.pop("generation", None)  # tokens per second
                found[f"{stage}/{path.name}"] = content
    return found


def without_generated(launched_run, copy: Path) -> Path:
    """The launched run's models (base, sft, dpo-*) with every generating stage's folder removed."""
    shutil.copytree(launched_run[1], copy)
    for stage in (*GENERATED, "report"):
        shutil.rmtree(copy / stage, ignore_errors=True)
    return copy


def test_every_generating_stage_under_torchrun_writes_what_one_process_wrote(launched_run, tmp_path):
    recipe, run_dir, _, _ = launched_run
    copy = without_generated(launched_run, tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dalign.cli"]
    done = launched([*torchrun, "run", recipe, f"run_dir={copy}", *TWO])
    assert generated_outputs(copy) == generated_outputs(run_dir)
    for stage in GENERATED:  # rank 0 alone writes the manifest, once
        assert done.stdout.count(f"[{stage}] running in") == 1
        assert manifest(copy, stage)["status"] == "complete"
    assert sorted(p.name for p in (copy / "completions" / "parts").glob("*.jsonl")) == ["part-00000.jsonl",
                                                                                         "part-00001.jsonl"]


def test_a_rank_killed_mid_stage_and_a_relaunch_on_one_process_lose_and_double_nothing(launched_run, tmp_path):
    recipe, run_dir, _, _ = launched_run
    copy = without_generated(launched_run, tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dalign.cli"]
    proc = subprocess.Popen([*torchrun, "run", recipe, f"run_dir={copy}", *TWO], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    # The evaluation splits its four models over the ranks: once one is graded, the others are under way.
    while not (copy / "evaluate" / "base.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = [pid for pid in children(proc.pid)]
    os.kill(ranks[-1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    assert manifest(copy, "evaluate")["status"] == "running"  # killed mid-stage
    launched([sys.executable, "-m", "dalign.cli", "run", recipe, f"run_dir={copy}", *TWO])  # one process, resuming
    assert generated_outputs(copy) == generated_outputs(run_dir)


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (torchrun's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


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
