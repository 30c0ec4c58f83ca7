"""A recipe on a tiny transformers model with every role behind a loopback OpenAI-compatible
server (the official client talks HTTP to it), run stage by stage through the same plan as the
offline recipe: dSFT and two dDPO variants (from dSFT and from the start) with LoRA, AI
feedback, MT-Bench, the win rate against a reference file, held-out reward accuracy. The
server plays its roles by reading the prompt templates' text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from dalign.cli import main
from dalign.config import ConfigError
from dalign.data import write_rows
from dalign.pretrain import build_model
from dalign.recipe import load_recipe
from dalign.run import plan, run_recipe
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
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers: no connection closed under a reused one

        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append((self.headers.get("Authorization"), json.dumps(request, sort_keys=True)))
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": play(request)}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # two ranks' clients at once overflow the default backlog of 5

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def recipe(tmp_path, world_tokenizer, one_thread, server, monkeypatch):
    """The recipe as a YAML file: a tiny transformers model to start from, every role on the server."""
    url, _ = server
    monkeypatch.setenv("DALIGN_TEST_KEY", SECRET)
    build_model(TINY, world_tokenizer, seed=0).save_pretrained(tmp_path / "start")
    world_tokenizer.save_pretrained(tmp_path / "start")
    write_rows(tmp_path / "prompts.jsonl", [{"instruction": r["prompt"][0]["content"]} for r in world_pairs(40)])
    write_rows(tmp_path / "questions.jsonl", [
        # Its first turn is inside every dSFT dialogue about trains: decontamination drops those.
        {"question_id": 1, "category": "writing", "turns": ["What should I know about trains?", "Make it sad."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 2?"], "reference": ["5", "10"]}])
    write_rows(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {w}.", "output": f"{w}.", "generator": "ref"}
                                           for w in ("hello", "goodbye", "thanks")])
    server_role = {"openai": {"base_url": url, "model": "tiny-teacher", "api_key_env": "DALIGN_TEST_KEY", "max_retries": 1}}
    tree = {
        "name": "tiny-real", "run_dir": str(tmp_path / "run"), "start": {"model": str(tmp_path / "start")},
        "roles": {role: server_role for role in ("teacher", "user_simulator", "rater", "judge", "comparer")},
        "dialogues": {"n_dialogues": 12, "min_turns": 1, "max_turns": 2, "max_tokens": 128, "chunk_size": 5,
                      "topics": ["cooking", "the weather", "trains"]},
        "sft": {"max_steps": 6, "max_length": 128, "per_device_batch_size": 4, "learning_rate": 1e-2,
                "lora": {"rank": 4, "alpha": 8}},
        "completions": {"per_prompt": 2, "max_new_tokens": 8, "chunk_size": 16, "prompts": {"path": str(tmp_path / "prompts.jsonl")},
                        "members": [{"name": "server", **server_role}, {"name": "start", "model": "start"},
                                    {"name": "sft", "model": "sft"}]},
        "pairs": {"test_fraction": 0.25},
        "dpo": {"max_steps": 10, "max_length": 128, "learning_rate": 2e-2, "beta": 0.5, "per_device_batch_size": 4,
                "lora": {"rank": 4}},
        "variants": [{"name": "main", "start": "sft"}, {"name": "nosft", "start": "start"}],
        "decontaminate": {"min_words": 4},  # the questions here are short: matched when contained whole
        "evaluate": {"max_new_tokens": 8, "batch_size": 8, "mt_bench": {"path": str(tmp_path / "questions.jsonl")},
                     "alpaca_eval": {"path": str(tmp_path / "alpaca.jsonl")}},
    }
    path = tmp_path / "tiny-real.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


STEPS = [["generate", "dialogues"], ["sft"], ["generate", "completions"], ["rate"], ["binarize"], ["dpo"],
         ["evaluate", "mt-bench"]]


def manifest(run_dir, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_the_whole_recipe_runs_stage_by_stage_through_servers_and_reruns_for_free(recipe, tmp_path, server, capsys):
    _, log = server
    run_dir = tmp_path / "run"
    assert main(["dpo", str(recipe)]) == 2  # a stage alone before its inputs: refused, naming the missing one
    assert "stage sft has not completed" in capsys.readouterr().err and not (run_dir / "dpo-main").exists()
    for step in STEPS:  # every stage alone, through the same plan as the offline recipe
        assert main([*step, str(recipe)]) == 0, step
    assert list(plan(load_recipe(recipe))) == ["dialogues", "sft", "completions", "ratings", "pairs", "dpo-main",
                                               "dpo-nosft", "evaluate"]
    # Dialogues: every one of the 12 kept or counted; the simulator's quotes are stripped.
    d = manifest(run_dir, "dialogues")
    assert d["rows"]["kept"] + sum(d["rows"]["dropped"].values()) == 12 and d["rows"]["kept"] >= 9
    first = json.loads((run_dir / "dialogues" / "dialogues.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"].startswith("What should I know about cooking")
    assert first["messages"][1]["content"] == GOOD
    assert d["usage"]["teacher"]["requests"] > 0 and d["usage"]["teacher"]["failures"] == 0
    # Decontamination: the dialogues that contain an MT-Bench question were dropped before dSFT, counted.
    dialogues = [json.loads(x) for x in (run_dir / "dialogues" / "dialogues.jsonl").read_text().splitlines()]
    copies = sum(any("what should i know about trains" in m["content"].lower() for m in r["messages"]) for r in dialogues)
    checked = manifest(run_dir, "sft")["decontamination"]
    assert copies > 0 and checked["by_set"] == {"mt_bench": copies, "alpaca_eval": 0} and checked["dropped"] == copies
    assert manifest(run_dir, "sft")["rows"]["kept"] == len(dialogues) - copies
    assert manifest(run_dir, "dpo-main")["decontamination"]["checked"]
    from dalign.report import decontamination_lines
    assert f"**run/sft**: {copies} of {len(dialogues)} training rows dropped for sharing a 13-word run with an " \
           f"evaluation set (mt_bench {copies}, alpaca_eval 0)." in decontamination_lines(run_dir)
    # dSFT with LoRA: adapters saved alone, the merged model loads without PEFT.
    assert (run_dir / "sft" / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    # AI feedback: 40 prompts, two completions each from server, start and sft; all rated.
    completions = manifest(run_dir, "completions")
    assert completions["rows"]["kept"] == 40
    assert sum(completions["completions_per_member"].values()) == 80
    assert set(completions["generation"]) == {"start", "sft"} and "server" in completions["usage"]
    ratings = [json.loads(x) for x in (run_dir / "ratings" / "ratings.jsonl").read_text().splitlines()]
    assert all(c["score"] is not None for r in ratings for c in r["completions"])
    pairs = manifest(run_dir, "pairs")
    assert pairs["train"] + pairs["dev"] + pairs["test"] + sum(pairs["rows"]["dropped"].values()) == 40
    # Two variants: dDPO from the dSFT model and from the starting model, each its own reference.
    assert manifest(run_dir, "dpo-main")["reference"] == str(run_dir / "sft" / "model")
    assert manifest(run_dir, "dpo-nosft")["reference"] == str(tmp_path / "start")
    # The evaluation: MT-Bench by the prompted judge, the win rate against the file's reference
    # answers, held-out reward accuracy for each variant.
    evaluation = manifest(run_dir, "evaluate")
    results = evaluation["results"]
    assert list(results) == ["start", "sft", "dpo-main", "dpo-nosft"] and evaluation["reference"] == "ref"
    assert all(r["questions"] == 2 and r["judge_failures"] == 0 and r["score"] == 7 for r in results.values())
    assert not any("greedy_accuracy" in r for r in results.values())  # a prompted judge gives grades only
    # A comparer that always prefers position (a) gives every model ties, no wins.
    assert all(r["win_rate"]["ties"] == 3 and r["win_rate"]["win_rate"] == 0.5 for r in results.values())
    for label in ("dpo-main", "dpo-nosft"):
        held = results[label]["reward_accuracy"]
        assert held["pairs"] == pairs["test"] and 0 <= held["reward_accuracy"] <= 1
    usage = evaluation["usage"]  # per model: 4 grades and 6 verdicts, asked or found in the cache
    assert usage["judge"]["requests"] + usage["judge"]["cache_hits"] == 4 * 2 * 2
    assert usage["comparer"]["requests"] + usage["comparer"]["cache_hits"] == 4 * 2 * 3
    # The key went to the server and nowhere else.
    assert log and all(auth == f"Bearer {SECRET}" for auth, _ in log)
    for path in run_dir.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    # A rerun skips every stage; a stage redone after a kill pays for no reply twice.
    sent = len(log)
    assert run_recipe(load_recipe(recipe))["evaluate"]["finished"] == evaluation["finished"]
    ratings_dir = run_dir / "ratings"
    for stale in [ratings_dir / "manifest.json", ratings_dir / "ratings.jsonl", *(ratings_dir / "parts").iterdir()]:
        stale.unlink()
    again = run_recipe(load_recipe(recipe))
    assert len(log) == sent
    assert again["ratings"]["usage"]["rater"]["cache_hits"] == 40


def test_a_recipe_says_what_it_lacks_before_any_work(tmp_path):
    base = [f"run_dir={tmp_path}", "start.model=x"]
    with pytest.raises(ConfigError, match=r"completions.members\[3\].world.*world generator"):
        load_recipe(None, base + ["completions.prompts={path: p.jsonl}"])
    with pytest.raises(ConfigError, match="roles.user_simulator.world"):
        load_recipe(None, base + ["dialogues.topics=[trains]"])
    with pytest.raises(ConfigError, match="roles.judge.world"):
        load_recipe(None, base + ["evaluate.mt_bench={path: q.jsonl}"])
    with pytest.raises(ConfigError, match="pairs.held_out"):
        load_recipe(None, base + ["pairs.source={path: p.jsonl}"])
    with pytest.raises(ConfigError, match="QLoRA.*(bitsandbytes|CUDA)"):
        run_recipe(load_recipe(None, base + ["dialogues.source={path: d.jsonl}", "pairs.source={path: p.jsonl}",
                                             "pairs.held_out={path: p.jsonl}", "sft.lora={load_in_4bit: true}"]))
    assert not any(tmp_path.iterdir())  # nothing ran


GENERATED = ("dialogues", "completions", "ratings", "pairs", "evaluate")


def rows_of(run_dir) -> dict:
    """Every row file of the generating stages and the evaluation's results, without timings."""
    found = {}
    for stage in GENERATED:
        for path in sorted((run_dir / stage).glob("*.json*")):
            if path.name != "manifest.json":
                content = [json.loads(x) for x in path.read_text().splitlines()] if path.suffix == ".jsonl" \
                    else json.loads(path.read_text())
                if isinstance(content, dict):
                    content.pop("generation", None)
                found[f"{stage}/{path.name}"] = content
    return found


def test_under_torchrun_every_request_is_made_once_and_the_rows_match(recipe, tmp_path, server):
    """The stages that ask the server, launched on two processes, against one process: the same
    requests, every row asked once over both ranks (the reply caches live in the stage folders,
    which the copy has not), and the same rows."""
    _, log = server

    def launch(*cmd: str) -> None:  # a fresh process each: no state left by earlier tests in this one
        done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-4000:]

    launch("-m", "dalign.cli", "run", str(recipe))
    single = sorted(body for _, body in log)
    assert len(single) == len(set(single))  # one process asks each request once
    copy = tmp_path / "launched"
    shutil.copytree(tmp_path / "run", copy)
    for stage in (*GENERATED, "report"):
        shutil.rmtree(copy / stage, ignore_errors=True)
    log.clear()
    launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dalign.cli", "run", str(recipe),
           f"run_dir={copy}")
    # The same distinct requests. Two models that write the same answer make the same judge request:
    # one process answers the second from its reply cache, two ranks may each ask it (both at once).
    assert set(body for _, body in log) == set(single)
    assert rows_of(copy) == rows_of(tmp_path / "run")
    for stage in ("dialogues", "completions", "ratings", "evaluate"):  # every row asked once over both ranks,
        def asked(run):  # from the server or from the cache, and the manifest counts both ranks
            return {name: u["requests"] + u["cache_hits"] for name, u in manifest(run, stage)["usage"].items()}
        assert asked(copy) == asked(tmp_path / "run"), stage
