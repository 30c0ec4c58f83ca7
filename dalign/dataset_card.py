"""The dataset card of a stage that writes rows (dialogues, completions, ratings, pairs): `configs:`
naming its row files by split (what `datasets.load_dataset(folder)` reads), then the schema,
counts and provenance. Written by dalign.cards.write_cards."""

from __future__ import annotations

from dalign.cards import DATASET_FILES, LICENSE, RunStages, counts_text, provenance_lines, render, rows_text
from dalign.judging import ASPECTS

MESSAGES = "list of {role, content}"
_COMPLETION_FIELDS = [
    ("prompt_id", "string", "id of the prompt"),
    ("prompt", MESSAGES, "the prompt: messages ending with a user turn"),
    ("category", "string", "category of a world instruction (absent for prompts read from a file)"),
    ("completions", "list of {model, principle, text}", "one completion per ensemble member drawn: the member, "
     "the principle system prompt it answered under (helpfulness, honesty, truthfulness or none) and its text "
     "(null when the generation failed)"),
]
SCHEMAS = {
    "dialogues": [
        ("id", "string", "dialogue id"),
        ("messages", MESSAGES, "optional system message first, then user and assistant turns alternating, "
         "ending with an assistant turn"),
        ("topic", "string", "seed topic the user simulator opened the dialogue from (generated rows)"),
        ("teacher", "string", "the model that wrote the assistant turns (generated rows)"),
        ("user_simulator", "string", "the model that wrote the user turns (generated rows)"),
    ],
    "completions": _COMPLETION_FIELDS,
    "ratings": _COMPLETION_FIELDS + [
        ("completions[].ratings", "{" + ", ".join(ASPECTS) + "}", "the rater's rating of each aspect, 1-5, or null "
         "for N/A; null when the completion was not rated"),
        ("completions[].rationale", "string", "the rater's rationale (or why the completion was not rated)"),
        ("completions[].score", "float", "mean of the aspect ratings given; null when not rated"),
        ("rating_raw", "list of string", "every reply of the rater for this prompt, retries included (null: "
         "the call failed)"),
        ("rating_order", "list of int", "the order the completions were shown in (indices into completions)"),
        ("rating_error", "string", "why the last reply did not parse (rows whose rating failed only)"),
    ],
    "pairs": [
        ("prompt_id", "string", "id of the prompt"),
        ("prompt", MESSAGES, "messages ending with a user turn"),
        ("chosen", MESSAGES, "the preferred answer: assistant messages"),
        ("rejected", MESSAGES, "the other answer: assistant messages"),
        ("score_chosen", "float", "the chosen answer's score (null when the source gave none)"),
        ("score_rejected", "float", "the rejected answer's score (null when the source gave none)"),
        ("chosen_model", "string", "the ensemble member that wrote the chosen answer (AI-feedback pairs)"),
        ("rejected_model", "string", "the ensemble member that wrote the rejected answer (AI-feedback pairs)"),
    ],
}
# pairs.source_rows: unpaired puts TRL's KTO rows in the pairs stage's train split (its test split stays pairs).
UNPAIRED_SCHEMA = [
    ("prompt_id", "string", "id of the prompt"),
    ("prompt", MESSAGES, "messages ending with a user turn"),
    ("completion", MESSAGES, "an answer: assistant messages"),
    ("label", "bool", "true: a desirable answer; false: an undesirable one"),
    ("score", "float", "the answer's score (null when the source gave none)"),
]
DESCRIPTIONS = {
    "dialogues": "Multi-turn dialogues for distilled supervised fine-tuning (dSFT), in the OpenAI messages format.",
    "completions": "AI-feedback prompts, each answered by several members of an ensemble (UltraFeedback style).",
    "ratings": "The completions, each rated 1-5 on four aspects by the rater (UltraFeedback style).",
    "pairs": "Preference pairs (prompt, chosen, rejected) for distilled DPO, in TRL's conversational format.",
}
TAGS = {"dialogues": ["sft", "conversational"], "completions": ["ai-feedback"], "ratings": ["ai-feedback"],
        "pairs": ["dpo", "preference", "ai-feedback"]}


def split_rows(name: str, manifest: dict) -> dict[str, int]:
    """Rows in each split's file, from the stage's manifest."""
    if name == "pairs":
        count = lambda v: v["kept"] if isinstance(v, dict) else v  # noqa: E731 (a read split has its read report)
        return {s: count(manifest[s]) for s in DATASET_FILES["pairs"] if s in manifest}
    rows = manifest["rows"]["kept"]
    if name == "ratings":  # a prompt whose rating failed stays in the file, its scores null
        rows += manifest["rows"]["dropped"].get("rating_failed", 0)
    return {"train": rows}


def dataset_card(recipe, name: str, stages: dict) -> str:
    run = RunStages(recipe, stages)
    manifest = run.manifest(name)
    counts = split_rows(name, manifest)
    files = DATASET_FILES[name]
    # datasets cannot load an empty file as a split ("corresponds to no data"): it stays out of configs.
    listed = {split: files[split] for split, n in counts.items() if n > 0}
    generated = _generated(name, manifest["config"])
    unpaired = name == "pairs" and manifest["config"]["pairs"].get("source_rows") == "unpaired"
    groups = ({"unpaired": ["train"], "pairs": [s for s in listed if s != "train"]} if unpaired
              else {"default": list(listed)})  # one config per schema: datasets loads a config's splits as one
    metadata = {"configs": [{"config_name": config, "data_files": [{"split": s, "path": listed[s]} for s in splits
                                                                   if s in listed]}
                            for config, splits in groups.items()],
                "license": LICENSE, "task_categories": ["text-generation"],
                "size_categories": [size_category(sum(counts.values()))],
                "tags": ["dalign", "zephyr-recipe", *TAGS[name], *(["synthetic"] if generated else [])],
                "pretty_name": f"{recipe.name} {name}"}
    comments = [f"license: {LICENSE}, as no recipe field sets one; set the terms of the models that wrote the rows "
                "and of the data sources before uploading"]
    body = [f"# {recipe.name} / {name}", "", DESCRIPTIONS[name] + f" Written by stage `{name}` of the dalign recipe "
            f"`{recipe.name}` (folder `{run.where(name)}/` of the run directory).", "", "## Files", "",
            "| split | file | rows |", "|---|---|---|"]
    body += [f"| {s} | {files[s]} | {n} |" for s, n in counts.items()]
    if empty := [s for s, n in counts.items() if n == 0]:
        body += ["", f"Left out of `configs` (empty, which `datasets` cannot load as a split): {', '.join(empty)}."]
    body += ["", "## Schema", "", "Messages are in the OpenAI format `{\"role\": \"system\"|\"user\"|\"assistant\", "
             "\"content\": str}`.", "", "| field | type | meaning |", "|---|---|---|"]
    body += [f"| `{f}` | {t} | {m} |" for f, t, m in SCHEMAS[name]]
    if unpaired:
        body += ["", "The train split (config `unpaired`) holds unpaired rows, TRL's KTO format, read from "
                 "pairs.source; the held-out split (config `pairs`) holds pairs, as above:", "",
                 "| field | type | meaning |", "|---|---|---|", *[f"| `{f}` | {t} | {m} |" for f, t, m in UNPAIRED_SCHEMA]]
    body += ["", "## Counts", "", f"Rows kept: {rows_text(manifest['rows'])}."] + count_lines(name, manifest)
    body += ["", "## Provenance", ""] + provenance_lines(run, name, manifest)
    config = ', "unpaired"' if unpaired else ""
    body += ["", "## How to load", "", "```python", "import datasets", "",
             f'splits = datasets.load_dataset("{run.where(name)}"{config})  # this folder: the files of `configs`',
             "```"]
    return render(metadata, comments, body)


def count_lines(name: str, manifest: dict) -> list[str]:
    lines = []
    if name == "ratings":
        failed = manifest["rows"]["dropped"].get("rating_failed", 0)
        lines.append(f"Prompts whose rating failed after {manifest['config']['rating']['retries']} retries: {failed} "
                     f"(kept in the file, with null ratings); replies asked for again: {manifest.get('retries', 0)}.")
        if not_rated := manifest.get("completions_not_rated"):
            lines.append(f"Completions not rated: {counts_text(not_rated)}.")
    if name == "completions":
        if flagged := manifest.get("flagged"):
            lines.append(f"Completions flagged (kept in the file): {counts_text(flagged)}.")
        if per_member := manifest.get("completions_per_member"):
            lines.append(f"Completions per member: {counts_text(per_member)}.")
    if name == "pairs" and "share_scores_differ" in manifest:
        lines.append(f"Pairs whose chosen and rejected scores differ: {manifest['share_scores_differ']:.1%}.")
    return lines


def size_category(n: int) -> str:
    """The hub's size_categories value for n rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1B")


def _generated(name: str, config: dict) -> bool:
    """Whether models of the run wrote the rows (completions and ratings always; dialogues and pairs
    unless read from a source)."""
    return name not in ("dialogues", "pairs") or config[name].get("source") is None
