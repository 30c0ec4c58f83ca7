"""The world's knowledge as a multiple-choice benchmark (the paper's Table 2 in miniature).

One question per atlas fact, in the plain-text phrasing the pretraining corpus states it in
(dalign.world.corpus), with three wrong choices of the same kind: lm-evaluation-harness scores
each choice by its log-likelihood after the question, as it does ARC. No chat template: the test
is what the model knows, not how it chats, so dSFT and dDPO can be seen keeping or losing it.
"""

from __future__ import annotations

import random

from dalign.world.atlas import LANGUAGES, PROFESSIONS, REGIONS, build_atlas


def fact_questions(seed: int = 0) -> list[dict]:
    """Rows {id, question, choices, answer (index)}: 3 per country, 2 per person (120)."""
    atlas, rng = build_atlas(), random.Random(seed)
    capitals, countries = [c.capital for c in atlas.countries], [c.name for c in atlas.countries]
    facts = []
    for c in atlas.countries:
        facts += [(f"The capital of {c.name} is", c.capital, capitals), (f"People in {c.name} speak", c.language, LANGUAGES),
                  (f"{c.name} lies in the", c.region, REGIONS)]
    for p in atlas.people:
        facts += [(f"{p.name} was a", p.profession, PROFESSIONS), (f"{p.name} was born in", p.country, countries)]
    rows = []
    for i, (question, right, pool) in enumerate(facts):
        choices = rng.sample([x for x in pool if x != right], 3) + [right]
        rng.shuffle(choices)
        rows.append({"id": i, "question": question, "choices": choices, "answer": choices.index(right)})
    return rows


def task_config(data_file: str) -> dict:
    """The lm_eval task config (as its YAML would hold it) reading the questions from a JSON-lines file."""
    return {"task": "world_facts", "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": data_file}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}", "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
