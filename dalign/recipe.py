"""The recipe: the stage configs of dalign.config gathered with the starting model, checked as a
whole (which sources can work together), and loaded from YAML with key=value overrides.

Every field is documented by the docstring on the line below it. An unknown key, a wrong
type, an impossible value or roles that cannot read each other fail before any work starts,
naming the key and the recipe; a recipe in the earlier layout is told where each key moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dalign.config import (BaseConfig, CompletionsConfig, ConfigError, DialoguesConfig, DPOConfig, DPOVariant,
                           EvalConfig, ModelShape, PairsConfig, RatingConfig, RolesConfig, SFTConfig, Strict,
                           _default_variants)
from dalign.losses import PreferenceLoss


class StartModel(Strict):
    """A Hugging Face model to start from instead of the world's base model."""

    model: str
    """Hub id, model folder or built-in name (smollm2-135m-instruct)."""
    chat_template: str | None = None
    """Jinja chat template (or 'zephyr', the paper's) for a model whose tokenizer has none, such as a
    base model; None keeps the tokenizer's. Every local model of the run is loaded with it."""
    architecture: dict[str, Any] | None = None
    """config.json fields (with model_type) to build the model from when its config is neither
    cached nor reachable: lets `--dry-run` plan a 7B run on a laptop with no network."""


class DryRunConfig(Strict):
    """Sizes `dalign run --dry-run` plans with, before the data is at hand."""

    sft_rows: int = Field(0, ge=0)
    """Rows of the dSFT data (ultrachat_200k train_sft: 207,865)."""
    dpo_rows: int = Field(0, ge=0)
    """Preference pairs (ultrafeedback_binarized train_prefs: 61,135)."""


class DecontaminateConfig(Strict):
    """N-gram decontamination of the training data against the recipe's evaluation sets read from
    files (evaluate.mt_bench, evaluate.alpaca_eval, evaluate.mc's ARC data): the sft and dpo stages
    drop every dialogue or pair that shares a run of `n` words with one, before training, and count
    the drops by evaluation set (dalign.decontaminate). The world's own held-out sets are drawn apart
    from every training prompt instead; world_facts asks the corpus's facts by design."""

    enabled: bool = True
    """False trains on the rows as they are (the manifest then says nothing was checked)."""
    n: int = Field(13, ge=1)
    """Words in a shared run that makes a match: 13, as GPT-3 and open-instruct."""
    min_words: int = Field(8, ge=1)
    """An evaluation text shorter than n words matches when contained whole; one shorter than this
    only when a training text equals it (a 4-word question occurs inside many innocent texts)."""


class Student(Strict):
    """A further student of another size, pretrained on the world's corpus and dSFT'd on the same
    dialogues with the same settings, evaluated beside the others (the paper's Table 1 sets larger
    models aligned by dSFT alone beside the small dDPO one)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Short name; its stages are base-<name> and sft-<name>."""
    model: ModelShape
    """Shape of its base model (the base section's other settings train it)."""


# Each section's seed that a recipe seed is added to: everything after the base model.
SEEDED = ("dialogues", "sft", "completions", "rating", "pairs", "dpo")


class RecipeConfig(Strict):
    name: str = "offline"
    """Name of the recipe, recorded in every manifest."""
    run_dir: str = "runs/offline"
    """Folder that receives one sub-folder per stage."""
    start: StartModel | None = None
    """The model the recipe aligns: 'world' (or null) pretrains the world's base model (the `base`
    stage); a model is a name, or {model, chat_template, architecture}."""
    skip: list[Literal["sft"]] = Field(default_factory=list)
    """Stages not run: ['sft'] for a model already instruction-tuned (its variants start from `start`)."""
    roles: RolesConfig = RolesConfig()
    """Teacher, user simulator, rater, judge and comparer, each from the world, a server or a local model."""
    base: BaseConfig = BaseConfig()
    """Pretraining the world's base model (when start is world)."""
    dialogues: DialoguesConfig = DialoguesConfig()
    """The dSFT dialogues: generated from seed topics, or read."""
    sft: SFTConfig = SFTConfig()
    """Distilled supervised fine-tuning."""
    completions: CompletionsConfig = CompletionsConfig()
    """AI feedback, part 1: completions from an ensemble."""
    rating: RatingConfig = RatingConfig()
    """AI feedback, part 2: roles.rater's ratings."""
    pairs: PairsConfig = PairsConfig()
    """AI feedback, part 3: binarization into preference pairs (or pairs read from a file)."""
    dpo: DPOConfig = DPOConfig()
    """Distilled DPO on the pairs: hyperparameters shared by every variant."""
    variants: list[DPOVariant] = Field(default_factory=_default_variants, min_length=1)
    """dDPO runs to make and compare: the first is the recipe's model, the rest are ablations."""
    evaluate: EvalConfig = EvalConfig()
    """Evaluation of every model: MT-Bench style, win rate, held-out reward accuracy, multiple choice."""
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    """Training rows that overlap an evaluation set are dropped before training and counted."""
    dry_run: DryRunConfig = DryRunConfig()
    """Data sizes for `dalign run --dry-run`."""
    students: list[Student] = Field(default_factory=list)
    """Students of other sizes aligned by dSFT only, evaluated beside the rest (world start only)."""
    seeds: list[int] = Field(default_factory=list)
    """Run every stage after the base model once per seed s, in run_dir/seed-<s>, with s added to the
    seed of dialogues, sft, completions, rating, pairs and dpo; the base stages run once, in run_dir.
    evaluate.seed stays, so every seed draws the same held-out prompts but for the few its own
    training prompts took (each draw avoids them). Empty: one run, as set."""
    shared_dir: str | None = None
    """Folder holding the base stages (base, base-<student>) when several runs share them (set for each
    seed's run by `seeds`); None: run_dir."""

    def for_seed(self, seed: int) -> "RecipeConfig":
        """The recipe one seed of `seeds` runs: seeds added, its own run_dir, the base stages shared."""
        update = {s: getattr(self, s).model_copy(update={"seed": getattr(self, s).seed + seed}) for s in SEEDED}
        return self.model_copy(update={**update, "seeds": [], "run_dir": f"{self.run_dir}/seed-{seed}",
                                       "shared_dir": self.shared_dir or self.run_dir})

    @field_validator("start", mode="before")
    @classmethod
    def _model_name(cls, value):
        if value == "world":
            return None
        return {"model": value} if isinstance(value, str) else value

    @property
    def world_start(self) -> bool:
        return self.start is None

    def dpo_for(self, variant: DPOVariant) -> DPOConfig:
        """The dDPO config one variant trains with: its epochs, learning rate and beta, else the dpo section's."""
        own = {k: getattr(variant, k) for k in ("epochs", "learning_rate", "beta", "loss") if getattr(variant, k) is not None}
        return self.dpo.model_copy(update=own)

    @model_validator(mode="after")
    def _coherent(self):
        check_sources(self)
        return self


def check_variant(r: "RecipeConfig", v: DPOVariant, key: str) -> None:
    """A variant's loss against its data and its reference, refused with the key to change."""
    loss = v.loss or r.dpo.loss
    unpaired = r.pairs.source is not None and r.pairs.source_rows == "unpaired"
    if unpaired and (v.method == "sft" or loss.needs_pairs):
        what = "method sft trains on chosen answers" if v.method == "sft" else f"loss {loss.value} needs (chosen, rejected) pairs"
        _refuse(f"{key}.method" if v.method == "sft" else f"{key}.loss" if v.loss else "dpo.loss",
                f"{what}, and pairs.source_rows: unpaired reads unpaired rows (prompt, completion, label): use loss: kto")
    if v.method == "sft":
        for name, value in (("loss", v.loss), ("reference", v.reference), ("sft_data", v.sft_data or None),
                            ("rows", None if v.rows == "pairs" else v.rows), ("desirable_score", v.desirable_score)):
            if value is not None:
                _refuse(f"{key}.{name}", "a variant of method sft trains no preference loss")
        return
    if loss is PreferenceLoss.ORPO and r.dpo.chosen_nll:
        _refuse(f"{key}.loss", "orpo's loss already holds the chosen answer's NLL; set dpo.chosen_nll: 0")
    if loss is PreferenceLoss.KTO and r.dpo.chosen_nll:
        _refuse(f"{key}.loss", "kto's objective has no chosen answer to add an NLL term to; set dpo.chosen_nll: 0")
    if v.rows == "ratings" and loss.needs_pairs:
        _refuse(f"{key}.rows", f"loss {loss.value} needs (chosen, rejected) pairs, and rows: ratings gives unpaired "
                "rows (prompt, completion, label): use loss: kto, or rows: pairs")
    if (v.rows == "ratings") != (v.desirable_score is not None):
        _refuse(f"{key}.desirable_score", "rows: ratings labels each rated completion by its desirable_score: set "
                "both, or neither")
    if v.rows == "ratings" and r.pairs.source is not None:
        _refuse(f"{key}.rows", "rows: ratings reads the AI-feedback ratings, and with pairs.source there are none")
    if v.sft_data and loss is not PreferenceLoss.ORPO:
        _refuse(f"{key}.sft_data", f"the dSFT data has no rejected answers: only orpo trains on it beside the pairs "
                f"(this variant's loss is {loss.value})")
    if v.sft_data and "sft" in r.skip:
        _refuse(f"{key}.sft_data", "skip has sft: this run writes no dSFT dialogues")
    if v.reference is not None and not loss.needs_reference:
        _refuse(f"{key}.reference", f"loss {loss.value} is reference-free: it reads no reference model")
    if v.reference not in (None, v.start) and r.dpo.lora is not None:
        _refuse(f"{key}.reference", "with dpo.lora the reference is the start with its adapters off: leave it unset")


def _model_refs(spec) -> list[tuple[str, str]]:
    """The model a role or member names, local or served, with its key."""
    return [("model", spec.model)] if spec.model else [("serve.model", spec.serve.model)] if spec.serve else []


def _refuse(key: str, why: str) -> None:
    raise ValueError(f"{key}: {why}")


def check_sources(r: "RecipeConfig") -> None:
    """What cannot work together, refused at load time with the key to change."""
    sft = "sft" not in r.skip
    feedback = r.pairs.source is None  # AI feedback runs: the ensemble and the rater are used
    writes_dialogues = sft and r.dialogues.source is None  # the teacher and the user simulator are used
    used = ["judge", "comparer"] + (["rater"] if feedback else [])
    used += ["teacher", "user_simulator"] if writes_dialogues else []
    refs = [(f"variants[{i}].start", v.start) for i, v in enumerate(r.variants)]
    refs += [(f"variants[{i}].reference", v.reference) for i, v in enumerate(r.variants) if v.reference]
    refs += [(f"completions.members[{i}].{key}", ref) for i, m in enumerate(r.completions.members) if feedback
             for key, ref in _model_refs(m)]
    refs += [(f"roles.{k}.{key}", ref) for k in used for key, ref in _model_refs(getattr(r.roles, k))]
    for key, ref in refs:
        if ref == "base" and not r.world_start:
            _refuse(key, "'base' is the world's pretrained model, and this recipe starts from a model: use 'start'")
        if ref == "sft" and not sft:
            _refuse(key, "'sft' names this run's dSFT model, but skip has sft")
    for i, v in enumerate(r.variants):
        check_variant(r, v, f"variants[{i}]")
    if r.students and not r.world_start:
        _refuse("students", "a student is pretrained on the world's corpus: students need start: world")
    if len(set(r.seeds)) != len(r.seeds):
        _refuse("seeds", f"a seed is listed twice: {r.seeds}")
    world_data = "answers only the world's own instructions"
    if r.completions.prompts is not None and feedback:
        for i, m in enumerate(r.completions.members):
            if m.world is not None:
                _refuse(f"completions.members[{i}].world", f"a world generator {world_data}; completions.prompts "
                        "are read from a file: give this member a model or openai source")
        if r.roles.rater.world is not None:
            _refuse("roles.rater.world", f"the world's rater {world_data}; completions.prompts are read from a file")
    if writes_dialogues:
        if r.dialogues.topics and r.roles.user_simulator.world is not None:
            _refuse("roles.user_simulator.world", "the world's user simulator opens only the world's seed topics; "
                    "dialogues.topics needs a user simulator from openai or model")
        if r.roles.teacher.world is not None and r.roles.user_simulator.world is None:
            _refuse("roles.teacher.world", f"the world teacher {world_data}, which only the world's user simulator "
                    "asks: give the teacher a model or openai source too")
    if r.evaluate.mt_bench is not None and r.roles.judge.world is not None:
        _refuse("roles.judge.world", "the world judge grades only the world's questions; evaluate.mt_bench needs a "
                "judge from openai or model")
    if r.evaluate.alpaca_eval is not None and r.roles.comparer.world is not None:
        _refuse("roles.comparer.world", "the world's comparer reads only the world's instructions; "
                "evaluate.alpaca_eval needs a comparer from openai or model")
    if r.pairs.source_rows == "unpaired" and feedback:
        _refuse("pairs.source_rows", "unpaired names what pairs.source holds, and no pairs.source is set")
    if not feedback and r.pairs.held_out is None:
        _refuse("pairs.held_out", "with pairs.source, set pairs.held_out too (pairs kept apart for the reward accuracy)")


# Keys of the earlier layout (a `real:` section, world settings at the top level), and where they went.
MOVED = {
    "teacher": "roles.teacher.world", "real.model": "start.model", "real.chat_template": "start.chat_template",
    "real.architecture": "start.architecture", "real.skip": "skip", "real.sft_rows": "dry_run.sft_rows",
    "real.dpo_rows": "dry_run.dpo_rows", "real.dialogues": "dialogues.source", "real.topics": "dialogues.topics",
    "real.teacher": "roles.teacher.openai and roles.rater.openai", "real.user_simulator": "roles.user_simulator.openai",
    "real.pairs": "pairs.source", "real.prompts": "completions.prompts", "real.held_out": "pairs.held_out",
    "real.judge": "roles.judge.openai and roles.comparer.openai", "real.mt_bench": "evaluate.mt_bench",
    "real.alpaca_eval": "evaluate.alpaca_eval", "real.mc": "evaluate.mc",
}


def moved_keys(tree: dict) -> list[str]:
    """Each key of the earlier layout in `tree`, with where it now lives."""
    found = []
    for old, new in MOVED.items():
        section, _, key = old.partition(".")
        node = tree.get(section)
        if (key and isinstance(node, dict) and key in node) or (not key and node is not None):
            found.append(f"{old} moved to {new}")
    if isinstance(tree.get("real"), dict):
        found += [f"real.{k} is not a recipe key any more" for k in tree["real"] if f"real.{k}" not in MOVED]
    members = (tree.get("completions") or {}).get("members") if isinstance(tree.get("completions"), dict) else None
    for i, m in enumerate(members or []):
        if isinstance(m, dict) and "flaws" in m:
            found.append(f"completions.members[{i}].flaws moved to completions.members[{i}].world")
    return found


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> RecipeConfig:
    """Read a YAML recipe (or the built-in defaults when path is None) and apply key=value overrides."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{source}: cannot read recipe: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set(tree, key.strip(), yaml.safe_load(raw))
    if moved := moved_keys(tree):
        raise ConfigError(f"{source}: this recipe is in the earlier layout (README, \"Recipes\")\n  " + "\n  ".join(moved))
    try:
        return RecipeConfig.model_validate(tree)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(recipe)"
            problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}" + (f" (got {e['input']!r})" if e["type"] != "missing" and "input" in e
                                                     and not isinstance(e["input"], dict) else ""))
        raise ConfigError(f"{source}: invalid recipe\n  " + "\n  ".join(problems)) from None
