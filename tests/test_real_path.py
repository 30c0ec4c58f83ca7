"""The whole real path through `dalign run` on a tiny model: a teacher, a user simulator, an
ensemble member and a judge behind a loopback OpenAI-compatible server (the official client
talks HTTP to it), dSFT and dDPO with LoRA, AI feedback, held-out reward accuracy and
MT-Bench. The server plays its roles by reading the prompt templates' text."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from transformers import AutoModelForCausalLM

from dalign.config import ConfigError, load_recipe
from dalign.data import write_rows
from dalign.pretrain import build_model
from dalign.real import run
from test_dpo import TINY, world_pairs

pytest.importorskip("peft")
SECRET = "sk-test-do-not-leak-4242"
GOOD = "Here is a good answer."


def play(request: dict) -> str:
    """The server's reply, by role: rater, judge, user simulator, or answering model."""
    text = request["messages"][-1]["content"]
    if text.startswith("Rate each response"):  # UltraFeedback rating: the server's own answers are best
        blocks = re.findall(r"\[Response (\d+)\]\n(.*?)\n\[End of response \1\]", text, flags=re.DOTALL)
        return "\n".join(f"Response {k}\n" + "".join(f"{a}: {5 if GOOD in body else 1}\n" for a in
                                                     ("Instruction-following", "Honesty", "Truthfulness", "Helpfulness"))
                         + "Rationale: plain." for k, body in blocks)
    if text.startswith("Two assistants answered"):  # a judge with a position bias: always the first
        return "The first is clearer.\nPreferred: (a)"
    if "Rating: [[" in text:
        return "It answers.\nRating: [[7]]"
    if text.startswith("You are playing a curious person"):
        topic = text.split("\n\n")[1]
        return f'"What should I know about {topic}, question {request["seed"]}?"'
    if text.startswith("You are playing a person in a conversation"):
        return "Tell me more."
    return GOOD


@pytest.fixture
def server():
    log = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append(self.headers.get("Authorization"))
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": play(request)}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def recipe(tmp_path, world_tokenizer, one_thread, server, monkeypatch):
    url, _ = server
    monkeypatch.setenv("DALIGN_TEST_KEY", SECRET)
    build_model(TINY, world_tokenizer, seed=0).save_pretrained(tmp_path / "start")
    world_tokenizer.save_pretrained(tmp_path / "start")
    write_rows(tmp_path / "prompts.jsonl", [{"instruction": r["prompt"][0]["content"]} for r in world_pairs(40)])
    write_rows(tmp_path / "questions.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write one line about rain.", "Make it sad."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 2?"], "reference": ["5", "10"]}])
    write_rows(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {w}.", "output": f"{w}.", "generator": "ref"}
                                           for w in ("hello", "goodbye", "thanks")])
    server_cfg = f"{{base_url: '{url}', model: tiny-teacher, api_key_env: DALIGN_TEST_KEY, max_retries: 1}}"
    return load_recipe(None, [
        f"run_dir={tmp_path / 'run'}", f"real.model={tmp_path / 'start'}",
        f"real.teacher={server_cfg}", "real.topics=[cooking, the weather, trains]",
        f"real.prompts={{path: {tmp_path / 'prompts.jsonl'}}}", f"real.judge={server_cfg}",
        f"real.mt_bench={{path: {tmp_path / 'questions.jsonl'}}}", f"real.alpaca_eval={{path: {tmp_path / 'alpaca.jsonl'}}}",
        "dialogues={n_dialogues: 12, min_turns: 1, max_turns: 2, max_tokens: 128, chunk_size: 5}",
        "sft={max_steps: 6, max_length: 128, per_device_batch_size: 4, learning_rate: 1e-2, lora: {rank: 4, alpha: 8}}",
        f"completions={{per_prompt: 2, max_new_tokens: 8, chunk_size: 16, members: [{{name: server, openai: {server_cfg}}},"
        " {name: start, model: start}, {name: sft, model: sft}]}",
        "pairs={test_fraction: 0.25}",
        "dpo={max_steps: 10, max_length: 128, learning_rate: 2e-2, beta: 0.5, per_device_batch_size: 4, lora: {rank: 4}}",
        "evaluate={max_new_tokens: 8, batch_size: 8}"])


def test_the_whole_real_path_runs_through_servers_and_reruns_for_free(recipe, tmp_path, server):
    _, log = server
    out = run(recipe)
    assert list(out) == ["dialogues", "sft", "completions", "ratings", "pairs", "dpo", "evaluate"]
    # Dialogues: every one of the 12 kept or counted; the simulator's quotes are stripped.
    d = out["dialogues"]
    assert d["rows"]["kept"] + sum(d["rows"]["dropped"].values()) == 12 and d["rows"]["kept"] >= 9
    first = json.loads((tmp_path / "run" / "dialogues" / "dialogues.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"].startswith("What should I know about cooking")
    assert first["messages"][1]["content"] == GOOD
    assert d["usage"]["teacher"]["requests"] > 0 and d["usage"]["teacher"]["failures"] == 0
    # dSFT with LoRA: adapters saved alone, the merged model loads without PEFT.
    assert (tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft" / "model")
    # AI feedback: 40 prompts, two completions each from server, start and sft; all rated.
    assert out["completions"]["rows"]["kept"] == 40
    assert sum(out["completions"]["completions_per_member"].values()) == 80
    assert set(out["completions"]["generation"]) == {"start", "sft"} and "server" in out["completions"]["usage"]
    ratings = [json.loads(x) for x in (tmp_path / "run" / "ratings" / "ratings.jsonl").read_text().splitlines()]
    assert all(c["score"] is not None for r in ratings for c in r["completions"])
    pairs = out["pairs"]
    assert pairs["train"] + pairs["test"] + sum(pairs["rows"]["dropped"].values()) == 40
    # dDPO ran from the dSFT model; held-out reward accuracy and MT-Bench for each model.
    assert out["dpo"]["start"] == str(tmp_path / "run" / "sft" / "model")
    held = out["evaluate"]["held_out"]
    assert held["pairs"] == pairs["test"] and 0 <= held["reward_accuracy"] <= 1
    mt = out["evaluate"]["mt_bench"]
    assert set(mt) == {"start", "sft", "dpo"}
    assert all(r["questions"] == 2 and r["judge_failures"] == 0 and r["score"] == 7 for r in mt.values())
    # AlpacaEval-style: a judge that always prefers position (a) gives every model ties, no wins.
    alpaca = out["evaluate"]["alpaca_eval"]
    assert alpaca["reference"] == "ref" and set(alpaca["results"]) == {"start", "sft", "dpo"}
    assert all(r["ties"] == 3 and r["win_rate"] == 0.5 and r["judge_failures"] == 0 for r in alpaca["results"].values())
    judged = out["evaluate"]["usage"]["judge"]  # per model: 4 grades and 6 verdicts, asked or found in the cache
    assert judged["requests"] + judged["cache_hits"] == 3 * (2 * 2 + 2 * 3)
    # The key went to the server and nowhere else.
    assert log and all(a == f"Bearer {SECRET}" for a in log)
    for path in (tmp_path / "run").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    # A rerun skips every stage; a stage redone after a kill pays for no reply twice.
    sent = len(log)
    assert run(recipe)["evaluate"]["finished"] == out["evaluate"]["finished"]
    ratings_dir = tmp_path / "run" / "ratings"
    for stale in [ratings_dir / "manifest.json", ratings_dir / "ratings.jsonl", *(ratings_dir / "parts").iterdir()]:
        stale.unlink()
    again = run(recipe)
    assert len(log) == sent
    assert again["ratings"]["usage"]["teacher"]["cache_hits"] == 40


def test_a_real_recipe_says_what_it_lacks_before_any_work(tmp_path):
    base = [f"run_dir={tmp_path}", "real.model=x"]
    with pytest.raises(ConfigError, match="real.dialogues"):
        run(load_recipe(None, base))
    with pytest.raises(ConfigError, match="offline-world generators"):
        run(load_recipe(None, base + ["real.skip=[sft]", "real.prompts={path: p.jsonl}",
                                      "real.teacher={base_url: 'http://127.0.0.1:9/v1', model: m}"]))
    with pytest.raises(ConfigError, match="QLoRA.*(bitsandbytes|CUDA)"):
        run(load_recipe(None, base + ["real.dialogues={path: d.jsonl}", "real.pairs={path: p.jsonl}",
                                      "real.held_out={path: p.jsonl}", "sft.lora={load_in_4bit: true}"]))
