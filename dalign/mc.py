"""Multiple-choice benchmarks of the Open LLM Leaderboard (v1), scored by lm-evaluation-harness.

The Zephyr paper reports its models on the Leaderboard: ARC-Challenge (25-shot), HellaSwag
(10-shot), MMLU (5-shot) and TruthfulQA mc2 (0-shot). Each task here is built from the config
lm_eval 0.4.13 bundles for it, so prompts, few-shot draws and metrics are the harness's own.
A task given local data files reads them instead of its hub dataset (the same config with the
dataset swapped), so it also runs where the hub cannot be reached; a task without local files
needs its hub dataset cached or reachable.

MMLU is lm_eval's own `mmlu` group of 57 subject tasks (its score the mean over questions, as
lm_eval reports it; the unweighted mean over subjects, as the Leaderboard reported it, is kept
beside it). Its local files are the hub's `all` layout, one file per split with a `subject`
column, and each subject task keeps only its own rows.

Outputs: `mc.json` (per task: acc, acc_norm, their standard errors, questions scored, shots;
provenance) and `mc_samples.jsonl` (per question: each choice's log-likelihood and the metrics).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, NonNegativeInt, model_validator

from dalign.config import Strict
from dalign.data import write_json
from dalign.manifest import code_version
from dalign.models import _hub_call, resolve

LM_EVAL_VERSION = "0.4.13"
LM_EVAL_REQUIREMENT = f"lm_eval[hf]=={LM_EVAL_VERSION}"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # file -> datasets builder


class MCError(RuntimeError):
    """An evaluation that cannot run as configured; the message says how to fix it."""


class _Facts(NamedTuple):
    shots: int  # on the Leaderboard
    eval_split: str  # the split lm_eval scores: its test split, else its validation split
    fewshot_split: str | None  # where its few-shot examples come from; None: it takes none
    hub: str  # the hub dataset its bundled config reads
    folder: str  # of lm_eval/tasks, holding the bundled YAML


class MCTask(str, Enum):
    ARC_CHALLENGE = "arc_challenge"
    HELLASWAG = "hellaswag"
    MMLU = "mmlu"
    TRUTHFULQA_MC2 = "truthfulqa_mc2"
    WORLD_FACTS = "world_facts"  # built in: the offline world's atlas (dalign.world.quiz), no data to fetch

    @property
    def facts(self) -> _Facts:
        return _FACTS[self]

    @property
    def by_subject(self) -> bool:
        """A group of per-subject tasks whose local files tell subjects apart by a `subject` column."""
        return self is MCTask.MMLU


_FACTS = {
    MCTask.ARC_CHALLENGE: _Facts(25, "test", "train", "allenai/ai2_arc (config ARC-Challenge)", "arc"),
    MCTask.HELLASWAG: _Facts(10, "validation", "train", "Rowan/hellaswag", "hellaswag"),
    MCTask.MMLU: _Facts(5, "test", "dev", "cais/mmlu (57 subject configs)", "mmlu/default"),
    # Its prompt already holds six fixed question-answer examples, and it has no training split.
    MCTask.TRUTHFULQA_MC2: _Facts(0, "validation", None, "truthfulqa/truthful_qa (config multiple_choice)",
                                  "truthfulqa"),
    MCTask.WORLD_FACTS: _Facts(0, "test", None, "none: built from dalign.world.quiz", ""),
}


class MCConfig(Strict):
    model: str
    """Model to score: a local folder, a hub id or a built-in name (see dalign.models.resolve)."""
    tasks: list[MCTask] = Field(default_factory=lambda: [t for t in MCTask if t is not MCTask.WORLD_FACTS], min_length=1)
    """Benchmarks to run, among arc_challenge, hellaswag, mmlu, truthfulqa_mc2 (the Leaderboard's, the
    default) and world_facts (the offline world's atlas, 0-shot)."""
    num_fewshot: dict[MCTask, NonNegativeInt] = Field(default_factory=lambda: {t: t.facts.shots for t in MCTask})
    """Few-shot examples per task; a task left out takes the Leaderboard's count (25, 10, 5, 0)."""
    limit: int | None = Field(None, ge=1)
    """Score only the first this many questions of each task (of each subject for MMLU); None scores all."""
    batch_size: int = Field(8, ge=1)
    """Sequences scored per forward pass."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights while scoring."""
    device: str = "cpu"
    """Torch device that scores: cpu, cuda, cuda:1, ..."""
    data: dict[MCTask, dict[str, Path]] = Field(default_factory=dict)
    """Local files by task and split (arc_challenge: train, test; hellaswag: train, validation; mmlu: dev, test;
    truthfulqa_mc2: validation), read instead of the hub dataset; only the few-shot split may go when shots are 0."""
    seed: int = 1234
    """Seed of the few-shot draws and of python, numpy and torch (lm_eval's default is 1234)."""

    def shots(self, task: MCTask) -> int:
        return self.num_fewshot.get(task, task.facts.shots)

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {[t.value for t in self.tasks]}")
        for task in self.tasks:
            if self.shots(task) and task.facts.fewshot_split is None:
                raise ValueError(f"{task.value} takes no few-shot examples (it has no split to draw them from; "
                                 f"the Leaderboard runs it 0-shot), got num_fewshot {self.shots(task)}")
        for task, files in self.data.items():
            if task is MCTask.WORLD_FACTS:
                raise ValueError("data is given for world_facts, which is built in (dalign.world.quiz)")
            if task not in self.tasks:
                raise ValueError(f"data is given for {task.value}, which is not among tasks")
            needed = {task.facts.eval_split} | ({task.facts.fewshot_split} if self.shots(task) else set())
            allowed = {task.facts.eval_split, task.facts.fewshot_split} - {None}
            if unknown := set(files) - allowed:
                raise ValueError(f"data for {task.value}: unknown split(s) {sorted(unknown)}; it reads {sorted(allowed)}")
            if missing := needed - set(files):
                raise ValueError(f"data for {task.value} lacks the split(s) {sorted(missing)} "
                                 f"(needed for {self.shots(task)}-shot scoring)")
            for split, path in files.items():
                if path.suffix not in DATA_SUFFIXES:
                    raise ValueError(f"data for {task.value}.{split}: {path} is not one of {sorted(DATA_SUFFIXES)}")
        return self


def files_in(folder: str | Path, task: MCTask) -> dict[str, Path]:
    """A task's split files in a folder: `<task>_<split>.<ext>`, `<split>.<ext>` or `<split>-00000-of-00001.<ext>`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MCError(f"data for {task.value}: {folder} is not a folder")
    found = {}
    for split in filter(None, (task.facts.eval_split, task.facts.fewshot_split)):
        names = {f"{task.value}_{split}", split, f"{split}-00000-of-00001"}
        matches = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.stem in names)
        if len(matches) > 1:
            raise MCError(f"{folder} holds several {split} files for {task.value}: {[p.name for p in matches]}")
        if matches:
            found[split] = matches[0]
    if not found:
        raise MCError(f"{folder} holds no data files for {task.value} (looked for {task.value}_<split>.jsonl, "
                      f"<split>.jsonl or .parquet, splits {task.facts.eval_split} and {task.facts.fewshot_split})")
    return found


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise MCError(f"dalign evaluate mc needs lm-evaluation-harness: pip install '{LM_EVAL_REQUIREMENT}'") from None
    if lm_eval.__version__ != LM_EVAL_VERSION:  # the task building below reads this version's internals
        raise MCError(f"dalign evaluate mc is written against lm_eval {LM_EVAL_VERSION}, found {lm_eval.__version__}: "
                      f"pip install '{LM_EVAL_REQUIREMENT}'")
    return lm_eval


def _leaves(manager, name: str) -> list[str]:
    """The task names under a task, group or tag of lm_eval's index, in order."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index[name]
    if entry.kind is Kind.GROUP:
        return [leaf for child in entry.cfg["task"] for leaf in _leaves(manager, child)]
    if entry.kind is Kind.TAG:
        return sorted(entry.tags)
    return [name]


def _only_subject(dataset, subject: str):
    return dataset.filter(lambda row: row["subject"] == subject)


def _subjects(path: Path) -> set[str]:
    import datasets

    rows = datasets.load_dataset(DATA_SUFFIXES[path.suffix], data_files=str(path), split="train")
    if "subject" not in rows.column_names:
        raise MCError(f"mmlu: {path} has no 'subject' column (expected the hub's 'all' layout: "
                      f"question, subject, choices, answer)")
    return set(rows.unique("subject"))


def _read_local(config: dict, files: dict[str, Path]) -> None:
    """Swap a bundled task config's hub dataset for local files, keeping everything else."""
    builders = {DATA_SUFFIXES[p.suffix] for p in files.values()}
    if len(builders) > 1:
        raise MCError(f"{config['task']}: local files mix formats {sorted(builders)}; give one format")
    config["dataset_path"], config["dataset_name"] = builders.pop(), None
    config["dataset_kwargs"] = {"data_files": {split: str(path) for split, path in files.items()}}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in files:  # e.g. ARC's validation split, which the Leaderboard never reads
            config[key] = None


def _build(manager, task: MCTask, shots: int, files: dict[str, Path] | None) -> tuple[list[str], list[str]]:
    """Put the task's configs, with its shots and any local files, in place of the bundled ones in the
    manager's index, so that loading the task by name builds lm_eval's own task or group from them.
    Returns the leaf tasks kept and, for MMLU from local files, the subjects those files lack."""
    from lm_eval.tasks._index import Entry, Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    present = _subjects(files[task.facts.eval_split]) if files and task.by_subject else None
    kept, missing = [], []
    for leaf in _leaves(manager, task.value):
        entry = manager.task_index[leaf]
        config = load_yaml(entry.yaml_path, resolve_func=True)
        scored = config.get("test_split") or config.get("validation_split")
        drawn = config.get("fewshot_split") or config.get("training_split")
        if (scored, drawn) != (task.facts.eval_split, task.facts.fewshot_split):
            raise MCError(f"lm_eval's {leaf} scores split {scored} with shots from {drawn}, not the "
                          f"{task.facts.eval_split}/{task.facts.fewshot_split} dalign expects: "
                          f"pip install '{LM_EVAL_REQUIREMENT}'")
        config["num_fewshot"] = shots
        config["fewshot_split"] = drawn  # the split lm_eval falls back to anyway, named so it does not warn
        if files:
            if task.by_subject:
                if config["dataset_name"] not in present:
                    for tag in entry.tags:  # the subject's group reaches it through its tag
                        manager.task_index[tag].tags.discard(leaf)
                    missing.append(leaf)
                    continue
                assert config.get("process_docs") is None  # MMLU's subject tasks have none to compose with
                config["process_docs"] = functools.partial(_only_subject, subject=config["dataset_name"])
            _read_local(config, files)
        # Without a yaml_path, lm_eval builds the task from cfg.
        manager.task_index[leaf] = Entry(name=leaf, kind=Kind.TASK, yaml_path=None, cfg=config, tags=entry.tags)
        kept.append(leaf)
    if not kept:
        raise MCError(f"{task.value}: the local files hold none of its subjects")
    return kept, missing


def _world_facts(manager, out: Path) -> Path:
    """Write the world's questions into `out` and index the task built from them."""
    from lm_eval.tasks._index import Entry, Kind

    from dalign.data import write_rows
    from dalign.world.quiz import fact_questions, task_config

    out.mkdir(parents=True, exist_ok=True)
    path = (out / "world_facts.jsonl").resolve()
    write_rows(path, fact_questions())
    manager.task_index["world_facts"] = Entry(name="world_facts", kind=Kind.TASK, yaml_path=None,
                                              cfg=task_config(str(path)), tags=set())
    return path


def _load(manager, task: MCTask, files: dict[str, Path] | None):
    """The lm_eval Task (or Group, for MMLU), its datasets loaded."""
    try:
        loaded = manager.load(task.value)
    except Exception as err:  # datasets raises many kinds; each becomes one clear message
        if files:
            raise MCError(f"{task.value}: cannot read the local files {[str(p) for p in files.values()]}: {err}") from err
        raise MCError(
            f"{task.value}: no local data was given and its hub dataset {task.facts.hub} cannot be loaded ({err}). "
            f"Give local files: `--data {task.value}=DIR` (a folder holding {task.value}_<split>.jsonl for the splits "
            f"{task.facts.eval_split}/{task.facts.fewshot_split}), or in the config "
            f"data: {{{task.value}: {{split: path}}}}; "
            f"or load it once where the hub is reachable so the datasets cache holds it.") from err
    return loaded["groups"].get(task.value) or loaded["tasks"][task.value]


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # absent, or the "N/A" lm_eval writes for the stderr of a single item
        return None


def _scores(res: dict, task: MCTask, leaves: list[str], missing: list[str]) -> dict:
    row = res["results"][task.value]
    shots = {res["n-shot"][leaf] for leaf in leaves}  # lm_eval reports shots per task, not per group
    scores = {"acc": _number(row.get("acc,none")), "acc_stderr": _number(row.get("acc_stderr,none")),
              "acc_norm": _number(row.get("acc_norm,none")), "acc_norm_stderr": _number(row.get("acc_norm_stderr,none")),
              "n": sum(res["n-samples"][leaf]["effective"] for leaf in leaves),
              "shots": shots.pop() if len(shots) == 1 else sorted(shots)}
    if task.by_subject:
        # The Leaderboard (v1) averaged MMLU's subjects without weights; lm_eval weights them by size.
        scores["acc_subject_mean"] = sum(res["results"][leaf]["acc,none"] for leaf in leaves) / len(leaves)
        scores["subjects"], scores["missing_subjects"] = len(leaves), missing
    return scores


def _sample_row(task: str, sample: dict) -> dict:
    """One scored question: its choices' log-likelihoods and metrics (the prompt is known by its hash)."""
    return {"task": task, "doc_id": sample["doc_id"], "target": sample["target"],
            "loglikelihoods": [ll for ll, _ in sample["filtered_resps"]], **{m: sample[m] for m in sample["metrics"]},
            "doc_hash": sample["doc_hash"], "prompt_hash": sample["prompt_hash"]}


def _to_json(value):
    return value.item() if hasattr(value, "item") else str(value)  # numpy scalars; anything else as text


@contextlib.contextmanager
def _without_lm_eval_bars():
    """lm_eval draws tqdm bars of its own (building each task's requests, tokenizing, scoring) and
    its evaluator has no switch for them: inside a stage, which shows its own bar, each of its
    modules' `tqdm` is replaced by one that is disabled, for the length of the call."""
    import lm_eval.api.model  # noqa: F401  (the modules that draw the bars, loaded before they are patched)
    import lm_eval.api.task  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    from tqdm import tqdm

    def hidden(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    patched = [m for name, m in list(sys.modules.items()) if name.startswith("lm_eval") and getattr(m, "tqdm", None) is tqdm]
    for module in patched:
        module.tqdm = hidden
    try:
        yield
    finally:
        for module in patched:
            module.tqdm = tqdm


def run_mc(cfg: MCConfig, out: Path, bars: bool = True) -> dict:
    """Score cfg.model on cfg.tasks with lm_eval; write out/mc.json (scores and provenance) and
    out/mc_samples.jsonl (one row per question scored), and return the content of mc.json.
    `bars`: lm_eval's progress bars (off inside the evaluation stage, which has its own)."""
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    pretrained = resolve(cfg.model)
    data = {}
    for task, files in cfg.data.items():
        # Absolute: lm_eval would read a relative path from the working directory. Not resolved:
        # the provenance names the path the user gave, however its folder is mounted or linked.
        data[task] = {split: Path(os.path.abspath(path.expanduser())) for split, path in files.items()}
        for split, path in data[task].items():
            if not path.is_file():
                raise MCError(f"data for {task.value}.{split}: {path} does not exist")
    # Indexing only the four tasks' folders: the whole of lm_eval/tasks takes ~13 s to scan.
    root = Path(lm_eval.__file__).parent / "tasks"
    bundled = [t for t in cfg.tasks if t is not MCTask.WORLD_FACTS]
    manager = TaskManager(include_defaults=False, include_path=[str(root / t.facts.folder) for t in bundled] or None)
    leaves = {task: _build(manager, task, cfg.shots(task), data.get(task)) for task in bundled}
    if MCTask.WORLD_FACTS in cfg.tasks:
        data[MCTask.WORLD_FACTS] = {"test": _world_facts(manager, out)}
        leaves[MCTask.WORLD_FACTS] = (["world_facts"], [])
        leaves = {task: leaves[task] for task in cfg.tasks}  # in the order asked
    loaded = [_load(manager, task, data.get(task)) for task in cfg.tasks]
    if not Path(pretrained).exists():
        from transformers import AutoConfig

        _hub_call(AutoConfig.from_pretrained, pretrained)  # an uncached hub model fails here, saying how to fix it
    start = time.time()
    with contextlib.nullcontext() if bars else _without_lm_eval_bars():
        res = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": pretrained, "dtype": cfg.dtype}, tasks=loaded,
            task_manager=manager, num_fewshot=None, batch_size=cfg.batch_size, device=cfg.device, limit=cfg.limit,
            log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    import datasets
    import torch
    import transformers

    report = {
        "results": {task.value: _scores(res, task, kept, missing) for task, (kept, missing) in leaves.items()},
        "provenance": {
            "lm_eval_version": lm_eval.__version__, "model": cfg.model, "model_path": pretrained, "limit": cfg.limit,
            "seeds": {"random": cfg.seed, "numpy": cfg.seed, "torch": cfg.seed, "fewshot": cfg.seed},
            "data": {task.value: {s: str(p) for s, p in data[task].items()} if task in data else f"hub: {task.facts.hub}"
                     for task in cfg.tasks},
            "dtype": cfg.dtype, "device": cfg.device, "batch_size": cfg.batch_size,
            "seconds": round(time.time() - start, 1),
            "config": cfg.model_dump(mode="json"), "code_version": code_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "lm_eval_results": res["results"],  # every metric lm_eval reported, MMLU's subjects included
        "samples": "mc_samples.jsonl",
    }
    out.mkdir(parents=True, exist_ok=True)
    samples = [_sample_row(leaf, sample) for leaf, rows in res["samples"].items() for sample in rows]
    (out / "mc_samples.jsonl").write_text("".join(json.dumps(row, default=_to_json) + "\n" for row in samples))
    write_json(out / "mc.json", report, indent=2, default=_to_json)  # last: a complete mc.json means complete outputs
    return report


def mc_table(report: dict) -> str:
    """The scores as a Markdown table."""
    def cell(value, stderr):
        return "-" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")

    lines = ["| task | shots | n | acc | acc_norm |", "|---|---|---|---|---|"]
    for task, s in report["results"].items():
        lines.append(f"| {task} | {s['shots']} | {s['n']} | {cell(s['acc'], s['acc_stderr'])} | "
                     f"{cell(s['acc_norm'], s['acc_norm_stderr'])} |")
    return "\n".join(lines)
