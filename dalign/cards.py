"""Hugging Face cards for a run's folders, so that a model folder or a dataset stage folder
uploads to the hub as it is (`huggingface-cli upload`) and says where it came from.

* Every saved model (`model/` of base, sft, sft-<student>, dpo-<variant>; `adapter/` beside it
  when the stage trained LoRA adapters) gets a model card: metadata, how it was trained, its
  provenance, its evaluation once an evaluation stage has scored it, and how to load it.
* Every stage that writes rows (dialogues, completions, ratings, pairs) gets a dataset card whose
  `configs:` list its row files by split, so `datasets.load_dataset(folder)` reads them (and not
  the parts, the manifest or anything else in the folder); then the schema, counts, provenance.

dalign.model_card and dalign.dataset_card write each kind; this module holds what both use (the
run's manifests, provenance, the atomic write). A card is a function of the manifests and
configs of the run alone (no clock, no absolute path), so a resumed run writes the same bytes as
an uninterrupted one. `write_cards` is called by dalign.run.run_stage on rank 0 when a stage
finishes or is found complete.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import yaml


# No recipe field sets a license, and the right one depends on the start model's, the teacher's
# and the data sources' terms, which dalign cannot know: "other" asks whoever uploads to set it.
LICENSE = "other"
MODEL_KINDS = ("base", "sft", "dpo")  # stage names before the first '-' that save model/
EVALUATION_KIND = "evaluate"
# The rows a dataset stage writes, by split: only these are data (parts/ and the manifest are not).
DATASET_FILES = {"dialogues": {"train": "dialogues.jsonl"}, "completions": {"train": "completions.jsonl"},
                 "ratings": {"train": "ratings.jsonl"},
                 "pairs": {"train": "train.jsonl", "test": "test.jsonl", "dev": "dev.jsonl"}}
# Built-in models (dalign.models.BUILTIN) and the hub model each one converts.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --- entry point -----------------------------------------------------------------------------

def write_cards(recipe, name: str, stages: dict) -> list[Path]:
    """The cards of stage `name`, which has completed: its model's or its dataset's; after an
    evaluation stage, the cards of the models it scored (their evaluation rows change)."""
    from dalign.run import stage_root

    kind = name.split("-")[0]
    if kind == EVALUATION_KIND:
        results = _read(Path(stage_root(recipe, name)) / name).get("results", {})
        refreshed = [label for label in results if label in stages and label.split("-")[0] in MODEL_KINDS]
        return [path for label in refreshed for path in write_cards(recipe, label, stages)]
    folder = Path(stage_root(recipe, name)) / name
    if kind in MODEL_KINDS:
        from dalign.model_card import model_card

        written = []
        for sub, adapter in (("model", False), ("adapter", True)):
            if (folder / sub).is_dir():
                written.append(folder / sub / "README.md")
                write_text(written[-1], model_card(recipe, name, stages, adapter))
        return written
    if name in DATASET_FILES:
        from dalign.dataset_card import dataset_card

        write_text(folder / "README.md", dataset_card(recipe, name, stages))
        return [folder / "README.md"]
    return []


def write_text(path: Path, text: str) -> None:
    """Write atomically through `.<name>.tmp` (the temp name run_stage's cleanup removes), and only
    when the bytes change: a rerun that finds every stage complete touches no card."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.unlink(missing_ok=True)  # left by a run killed while writing, in a stage that is now skipped
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(metadata: dict, comments: list[str], body: list[str]) -> str:
    """A card: the YAML metadata block (comments at its end), then the Markdown body."""
    block = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=10_000)
    return "---\n" + block + "".join(f"# {c}\n" for c in comments) + "---\n\n" + "\n".join(body).rstrip() + "\n"


def hub_id(spec: str) -> str | None:
    """The hub id a model spec names: a built-in's source model, a hub id as is; None for a folder."""
    if spec in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[spec]
    return spec if _HUB_ID.match(spec) and not Path(spec).exists() else None


# --- provenance ------------------------------------------------------------------------------

class RunStages:
    """The manifests of the run a card is written from, found by the recipe's plan."""

    def __init__(self, recipe, stages: dict):
        from dalign.run import stage_root

        self.recipe, self.stages, self.root = recipe, stages, stage_root

    def folder(self, name: str) -> Path:
        return Path(self.root(self.recipe, name)) / name

    def manifest(self, name: str) -> dict:
        return _read(self.folder(name))

    def where(self, name: str) -> str:
        """The stage folder from the top run directory (seed-<s>/sft for a seed's run)."""
        top = self.recipe.shared_dir or self.recipe.run_dir
        return Path(os.path.relpath(self.folder(name), top)).as_posix()

    def upstream(self, name: str) -> list[str]:
        """Every stage `name` reads, directly or not, nearest first."""
        found, todo = [], list(self.stages[name][0])
        while todo:
            if (n := todo.pop(0)) not in found:
                found.append(n)
                todo += self.stages[n][0]
        return found

    def evaluations(self, name: str) -> list[tuple[str, dict]]:
        """Complete evaluations that scored `name`: the run's evaluate stages, and each seed's when the
        stage is shared by several runs."""
        root = self.folder(name).parent
        found = []
        for path in sorted([*root.glob("evaluate*/manifest.json"), *root.glob("seed-*/evaluate*/manifest.json")]):
            evaluation = json.loads(path.read_text())
            if evaluation.get("status") == "complete" and name in evaluation.get("results", {}):
                found.append((path.parent.relative_to(root).as_posix(), evaluation))
        return found


def provenance_lines(run: RunStages, name: str, manifest: dict) -> list[str]:
    lines = [f"- recipe: `{run.recipe.name}`; stage `{name}`, config hash `{manifest.get('config_hash')}`",
             f"- code version: `{manifest.get('code_version')}`",
             f"- seeds: {counts_text(manifest.get('seeds') or {})}"]
    for n in [name, *run.upstream(name)]:
        m = run.manifest(n) if n != name else manifest
        config = m.get("config", {})
        if n == "dialogues":
            source = config["dialogues"].get("source")
            lines.append(f"- dialogues: read from {source_text(source)}" if source else
                         f"- teacher: {m.get('teacher')} ({role_text(config['roles']['teacher'])}); user simulator: "
                         f"{m.get('user_simulator')} ({role_text(config['roles']['user_simulator'])})")
        elif n == "completions":
            prompts = config["completions"].get("prompts")
            members = ", ".join(f"{mem['name']} ({role_text(mem)}, temperature {value_text(mem['temperature'])})"
                                for mem in config["completions"]["members"])
            lines.append(f"- AI-feedback prompts: {'read from ' + source_text(prompts) if prompts else 'world instructions'}"
                         f"; ensemble: {members}; {config['completions']['per_prompt']} members per prompt")
        elif n == "ratings":
            lines.append(f"- rater: {m.get('rater')} ({role_text(config['roles']['rater'])})")
        elif n == "pairs":
            pairs = config["pairs"]
            lines.append(f"- pairs: read from {source_text(pairs['source'])}, held out {source_text(pairs['held_out'])}"
                         if pairs.get("source") else f"- pairs: rejection rule `{pairs['rejection']}`, test fraction "
                         f"{value_text(pairs['test_fraction'])}, dev fraction {value_text(pairs['dev_fraction'])}")
            if pairs.get("held_out") and not pairs.get("source"):
                lines.append(f"- test split read from {source_text(pairs['held_out'])}")
        elif n.split("-")[0] in MODEL_KINDS and n != name:
            lines.append(f"- upstream model, stage `{n}` (training rows: {rows_text(m.get('rows'))})")
    return lines


def role_text(spec: dict) -> str:
    if spec.get("world") is not None:
        return "the offline world"
    if spec.get("openai") is not None:
        return f"model {spec['openai']['model']} behind an OpenAI-compatible server"
    if spec.get("serve") is not None:
        return f"{model_name(spec['serve']['model'])}, served for the stage"
    return f"local model {model_name(spec['model'])}"


def model_name(spec: str) -> str:
    """A model as a card may name it: this run's by role, a hub id as is, a folder by its name (no
    absolute path: it would differ between two run directories and say nothing once uploaded)."""
    if spec in ("start", "sft", "base"):
        return f"this run's {spec}"
    return hub_id(spec) or Path(spec).name


def source_text(source: dict | None) -> str:
    if source is None:
        return "-"
    if source.get("dataset"):
        return f"hub dataset {source['dataset']}" + (f" ({source['name']})" if source.get("name") else "") + \
            f", split {source['split']}"
    return f"file {Path(source['path']).name}"


def dataset_name(run: RunStages, stage: str) -> str | None:
    """The name a model card's `datasets` gives a stage it trained on: a hub id when the rows were
    read from the hub, else the dataset stage's folder name."""
    if stage not in DATASET_FILES:
        return None
    config = run.manifest(stage)["config"]
    section = {"dialogues": ("dialogues", "source"), "pairs": ("pairs", "source")}.get(stage)
    if section and (source := config[section[0]].get(section[1])) and source.get("dataset"):
        return source["dataset"]
    return stage if stage in ("dialogues", "pairs") else None


def decontamination_text(checked: dict) -> str:
    if not checked.get("checked"):
        return f"not checked ({checked.get('reason')})"
    return f"{checked['dropped']} of {checked['rows']} rows dropped ({counts_text(checked.get('by_set') or {}) or 'none'})"


def rows_text(rows) -> str:
    if not isinstance(rows, dict):
        return value_text(rows)
    text = f"{rows.get('kept')} kept"
    if dropped := {k: v for k, v in (rows.get("dropped") or {}).items() if v}:
        text += f", dropped {counts_text(dropped)}"
    else:
        text += ", none dropped"
    if rows.get("replay"):
        text += f", plus {rows['replay']} pretraining-text replay sequences"
    return text


def counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _read(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, spec: str) -> str:
    return format(value, spec) if finite(value) else "n/a"


def value_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)
