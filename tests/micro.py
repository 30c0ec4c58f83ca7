"""The micro recipe: every stage of the default recipe in seconds (tests/conftest.py's micro_run
runs it once per session; test_stages, test_report_page and test_launch read or rerun it)."""

from __future__ import annotations

from pathlib import Path

RECIPE = """\
name: micro
run_dir: {run_dir}
base: {{corpus_documents: 300, max_steps: 6, per_device_batch_size: 4, max_length: 64, log_every: 2,
        model: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, max_position: 128, vocab_size: 600}}}}
dialogues: {{n_dialogues: 40, chunk_size: 16}}
sft: {{max_steps: 4, per_device_batch_size: 4, max_length: 128, log_every: 1}}
completions: {{n_prompts: 16, chunk_size: 8, max_new_tokens: 8}}
pairs: {{dev_fraction: 0.0}}  # as pinned
dpo: {{max_steps: 2, per_device_batch_size: 4, max_length: 128, learning_rate: 1.0e-4}}  # as pinned
variants: [{{name: main}}, {{name: nosft, start: base}}]
evaluate: {{questions_per_category: 1, max_new_tokens: 8, pass_k: 2, win_rate_instructions: 8}}
"""


def write_recipe(folder: Path, run_dir: Path) -> Path:
    path = folder / "micro.yaml"
    path.write_text(RECIPE.format(run_dir=run_dir))
    return path
