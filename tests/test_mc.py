"""`dalign evaluate mc`: lm_eval's Leaderboard tasks on local files. ARC-Challenge scored by lm_eval
must equal the same questions scored by hand (summed log-likelihood of each choice); bad task
names, missing data and a missing lm_eval fail at once, saying how to fix them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dalign.cli import main
from dalign.mc import LM_EVAL_REQUIREMENT, MCConfig, MCError, run_mc

ARC = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"
ARC_FILES = {"train": ARC / "arc_challenge_train.jsonl", "test": ARC / "arc_challenge_test.jsonl"}

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason=f"lm_eval is not installed: pip install '{LM_EVAL_REQUIREMENT}'")
needs_arc = pytest.mark.skipif(not all(p.is_file() for p in ARC_FILES.values()),
                               reason=f"the ARC-Challenge sample is absent ({ARC})")


@pytest.fixture
def tiny(world_tokenizer, tmp_path) -> Path:
    """A 2-layer Llama with random weights and the world tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(world_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    return folder


def by_hand(folder: Path, rows: list[dict]) -> list[list[float]]:
    """Each choice's log-likelihood under the zero-shot ARC prompt, without lm_eval: the summed
    log-probability of the tokens of " <choice>" after "Question: <question>\nAnswer:"."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scores = []
    for row in rows:
        prompt = f"Question: {row['question']}\nAnswer:"
        prompt_ids = tokenizer(prompt)["input_ids"]
        scores.append([])
        for choice in row["choices"]["text"]:
            ids = tokenizer(prompt + " " + choice)["input_ids"]
            assert ids[:len(prompt_ids)] == prompt_ids  # the choice's tokens are exactly what follows the prompt
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # (T-1, V): predicts tokens 1..T-1
            token_logp = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            scores[-1].append(token_logp[len(prompt_ids) - 1:].sum().item())
    return scores


def accuracy(rows: list[dict], scores: list[list[float]], per_character: bool = False) -> float:
    """Share of questions whose best-scored choice is the answer; lm_eval's acc_norm divides by the choice's length."""
    correct = 0
    for row, lls in zip(rows, scores):
        texts = row["choices"]["text"]
        ranked = [ll / len(text) if per_character else ll for ll, text in zip(lls, texts)]
        correct += max(range(len(ranked)), key=ranked.__getitem__) == row["choices"]["label"].index(row["answerKey"])
    return correct / len(rows)


@needs_lm_eval
@needs_arc
def test_arc_zero_shot_equals_the_log_likelihoods_computed_by_hand(tiny, tmp_path, one_thread):
    cfg = MCConfig(model=str(tiny), tasks=["arc_challenge"], num_fewshot={"arc_challenge": 0}, limit=20,
                   data={"arc_challenge": ARC_FILES})
    report = run_mc(cfg, tmp_path / "out")

    arc = report["results"]["arc_challenge"]
    assert arc["n"] == 20 and arc["shots"] == 0
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1
    assert arc["acc_stderr"] > 0 and arc["acc_norm_stderr"] > 0
    written = json.loads((tmp_path / "out" / "mc.json").read_text())
    assert written["results"] == report["results"]
    prov = written["provenance"]
    assert prov["lm_eval_version"] == "0.4.13" and prov["model"] == str(tiny) and prov["limit"] == 20
    assert prov["seeds"] == {"random": 1234, "numpy": 1234, "torch": 1234, "fewshot": 1234}
    assert prov["data"]["arc_challenge"] == {split: str(path) for split, path in ARC_FILES.items()}

    # lm_eval's limit scores the first N questions of the test split.
    rows = [json.loads(line) for line in ARC_FILES["test"].read_text().splitlines()[:20]]
    scores = by_hand(tiny, rows)
    assert (arc["acc"], arc["acc_norm"]) == (accuracy(rows, scores), accuracy(rows, scores, per_character=True))
    # Per question too: a random model's accuracy barely depends on the prompt, its log-likelihoods do.
    samples = [json.loads(line) for line in (tmp_path / "out" / "mc_samples.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(20))
    for sample, lls in zip(samples, scores):
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-3)  # batched with padding vs one at a time


@needs_lm_eval
@needs_arc
def test_the_cli_reads_a_data_folder_and_prints_the_scores(tiny, tmp_path, one_thread, capsys):
    linked = tmp_path / "linked-arc"  # a data folder reached through a symbolic link, as a mount may be
    linked.symlink_to(ARC, target_is_directory=True)
    code = main(["evaluate", "mc", str(tiny), "--tasks", "arc_challenge", "--data", f"arc_challenge={linked}",
                 "--num-fewshot", "0", "--limit", "4", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "| arc_challenge | 0 | 4 |" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "mc.json").read_text())
    # The provenance names the path given, not where the link leads.
    assert written["provenance"]["data"]["arc_challenge"]["train"] == str(linked / ARC_FILES["train"].name)


def test_an_unknown_task_is_refused_naming_the_choices(tmp_path, capsys):
    with pytest.raises(ValidationError, match="arc_challenge', 'hellaswag', 'mmlu', 'truthfulqa_mc2' or 'world_facts'"):
        MCConfig(model="m", tasks=["arc_easy"])
    assert main(["evaluate", "mc", "m", "--data", f"arc_easy={tmp_path}", "--out", str(tmp_path)]) == 2
    assert "unknown task 'arc_easy': choose among arc_challenge, hellaswag, mmlu, truthfulqa_mc2" in capsys.readouterr().err


def test_local_data_must_cover_the_splits_the_task_reads():
    with pytest.raises(ValidationError, match=r"arc_challenge lacks the split\(s\) \['train'\] \(needed for 25-shot"):
        MCConfig(model="m", tasks=["arc_challenge"], data={"arc_challenge": {"test": "t.jsonl"}})
    MCConfig(model="m", tasks=["arc_challenge"], num_fewshot={"arc_challenge": 0},
             data={"arc_challenge": {"test": "t.jsonl"}})  # 0-shot needs no train split
    with pytest.raises(ValidationError, match="data is given for hellaswag, which is not among tasks"):
        MCConfig(model="m", tasks=["arc_challenge"], data={"hellaswag": {"validation": "v.jsonl", "train": "t.jsonl"}})
    with pytest.raises(ValidationError, match="truthfulqa_mc2 takes no few-shot examples"):
        MCConfig(model="m", tasks=["truthfulqa_mc2"], num_fewshot={"truthfulqa_mc2": 5})


@needs_lm_eval
def test_a_task_without_local_data_or_cached_hub_data_fails_clearly(tmp_path):
    # A fresh process with an empty, offline hub cache: the datasets library reads both at import.
    code = ("from pathlib import Path\nfrom dalign.mc import MCConfig, MCError, run_mc\n"
            f"try:\n    run_mc(MCConfig(model={str(tmp_path)!r}, tasks=['hellaswag']), Path({str(tmp_path / 'out')!r}))\n"
            "except MCError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "hellaswag: no local data was given and its hub dataset Rowan/hellaswag cannot be loaded" in out.stdout
    assert "--data hellaswag=DIR" in out.stdout
    assert not (tmp_path / "out").exists()  # it failed before loading the model


def test_a_missing_lm_eval_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(MCError, match=r"pip install 'lm_eval\[hf\]==0\.4\.13'"):
        run_mc(MCConfig(model=str(tmp_path)), tmp_path / "out")


def test_the_world_facts_are_one_right_choice_each_in_the_corpus_phrasing():
    from dalign.world.atlas import build_atlas
    from dalign.world.quiz import fact_questions

    rows = fact_questions()
    atlas = build_atlas()
    assert len(rows) == 3 * len(atlas.countries) + 2 * len(atlas.people)
    assert all(len(set(r["choices"])) == 4 for r in rows)
    capital = next(r for r in rows if r["question"] == f"The capital of {atlas.countries[0].name} is")
    assert capital["choices"][capital["answer"]] == atlas.countries[0].capital
    assert 0.15 < sum(r["answer"] == 0 for r in rows) / len(rows) < 0.35  # the right one's place is shuffled


@needs_lm_eval
def test_world_facts_scored_by_lm_eval_equal_the_choices_scored_by_hand(tiny, tmp_path, one_thread):
    from dalign.world.quiz import fact_questions

    report = run_mc(MCConfig(model=str(tiny), tasks=["world_facts"], limit=6), tmp_path / "out")
    samples = [json.loads(ln) for ln in (tmp_path / "out" / "mc_samples.jsonl").read_text().splitlines()]
    rows = fact_questions()[:6]
    model = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for sample, row in zip(sorted(samples, key=lambda s: s["doc_id"]), rows):
        head = tokenizer(row["question"])["input_ids"]
        for choice, got in zip(row["choices"], sample["loglikelihoods"]):
            ids = tokenizer(row["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            want = logp.gather(-1, torch.tensor(ids[1:])[:, None])[len(head) - 1:, 0].sum().item()
            assert got == pytest.approx(want, abs=1e-4)
        assert sample["acc"] == float(max(range(4), key=lambda i: sample["loglikelihoods"][i]) == row["answer"])
    assert report["results"]["world_facts"]["n"] == 6
    assert report["results"]["world_facts"]["acc"] == pytest.approx(sum(s["acc"] for s in samples) / 6)
