"""The real path against a real OpenAI-compatible server on 127.0.0.1: `transformers serve`
serving a small local model, reached through the official `openai` client.

Dialogue generation, rating and MT-Bench-style evaluation run through the OpenAI backend.
The served model is tiny and untrained, so most of what it writes is noise: the point is
that whatever it replies, every row ends parsed or counted as failed, none lost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dalign.config import DialoguesConfig, EvalConfig
from dalign.data import read_rows
from dalign.evaluate import evaluate_mt_bench
from dalign.generate import run_dialogues
from dalign.openai_backend import OpenAIBackend, OpenAIConfig
from dalign.prompted import PromptedJudge, PromptedUser
from dalign.rate import run_rating
from dalign.serving import free_port, wait_healthy

CLI = Path(sys.executable).parent / "transformers"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def server(world_tokenizer, tmp_path_factory):
    if not CLI.exists() or shutil.which("transformers", path=str(CLI.parent)) is None:
        pytest.skip("the `transformers serve` command is not installed (pip install 'transformers[serving]')")
    root = tmp_path_factory.mktemp("serve")
    folder = root / "tiny-chat"
    torch.manual_seed(0)
    tok = world_tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=4096,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (root / "hf" / "hub").mkdir(parents=True)  # the server lists models from the hub cache
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(CLI), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", 180, root / "server.log", "transformers serve")
        yield OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", model=str(folder), api_key_env=None,
                           max_concurrency=2, timeout_s=60, max_retries=1, backoff_base_s=0.1, backoff_max_s=0.5,
                           cache_dir=str(root / "cache"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_dialogues_through_a_real_server(server, world_tokenizer, tmp_path):
    teacher = OpenAIBackend(server, name="teacher")
    user = PromptedUser(OpenAIBackend(server, name="user"))
    cfg = DialoguesConfig(n_dialogues=4, min_turns=1, max_turns=2, chunk_size=2, max_tokens=4096)
    summary = run_dialogues(cfg, world_tokenizer, user, teacher, tmp_path)
    rows = read_rows(tmp_path / "dialogues.jsonl")
    assert summary["rows"]["kept"] == len(rows)
    assert len(rows) + sum(summary["rows"]["dropped"].values()) == cfg.n_dialogues
    assert teacher.usage()["requests"] + teacher.usage()["cache_hits"] > 0
    for row in rows:
        assert [m["role"] for m in row["messages"]][:2] == ["user", "assistant"]


def test_rating_through_a_real_server(server, tmp_path):
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": q}],
             "completions": [{"model": "a", "text": "Paris."}, {"model": "b", "text": "I do not know."}]}
            for i, q in enumerate(["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"])]
    rater = OpenAIBackend(server, name="rater")
    facts = run_rating(rows, rater, 1, 2, 0, tmp_path)
    rated = read_rows(tmp_path / "ratings.jsonl")
    assert len(rated) == 3
    assert facts["rows"]["kept"] + facts["rows"]["dropped"]["rating_failed"] == 3
    for row in rated:  # each row is either fully rated or marked failed with the raw replies kept
        scores = [c["score"] for c in row["completions"]]
        assert all(s is not None for s in scores) or ("rating_error" in row and all(s is None for s in scores))
        assert row["rating_raw"] and all(isinstance(r, str) for r in row["rating_raw"])
    assert rater.usage()["requests"] >= 3


def test_mt_bench_through_a_real_server(server):
    questions = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sad."]},
                 {"question_id": 2, "category": "math", "turns": ["What is 12 * 3?", "And divided by 4?"],
                  "reference": ["36", "9"]}]
    if (SHARED / "mt_bench" / "question.jsonl").exists():
        from dalign.readers import SourceConfig, read_mt_bench
        questions = read_mt_bench(SourceConfig(path=str(SHARED / "mt_bench" / "question.jsonl"), limit=4))
    student = OpenAIBackend(server, name="student")
    judge = PromptedJudge(OpenAIBackend(server, name="judge-model"))
    result = evaluate_mt_bench(student, judge, questions, EvalConfig(max_new_tokens=16, pass_k=1))
    answers = result["answers"]
    assert len(answers) == len(questions)
    judged = [j for a in answers for j in a["judgments"]]
    assert len(judged) == 2 * len(questions)
    failed = sum(j["score"] is None for j in judged)
    # Every judgment is parsed or counted; the greedy and pass@k checks add their own.
    assert failed <= result["judge_failures"]
    for j in judged:
        assert (j["score"] is None) == ("error" in j) and isinstance(j["raw"], str)
    # The judge saw the reference answer where MT-Bench shows one (math here).
    math = next((q for q in questions if q["category"] == "math" and q.get("reference")), None)
    if math is not None:
        req = judge.request([{"role": "system", "content": "Reference answer:\n" + math["reference"][0]},
                             {"role": "user", "content": math["turns"][0]}, {"role": "assistant", "content": "x"}])
        assert math["reference"][0] in req
