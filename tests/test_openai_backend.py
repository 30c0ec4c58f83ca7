"""OpenAIBackend against a real local HTTP server, through the official openai client.

The server answers POST /v1/chat/completions following a per-row script keyed by the last
message's text: each request pops the next action, and the last action repeats forever (so
["500"] always fails and ["500", "ok"] fails once). It records every request it receives.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from dalign.backends import Sampling
from dalign.openai_backend import BackendError, OpenAIBackend, OpenAIConfig, _RateLimiter

PROMPT_TOKENS, COMPLETION_TOKENS = 7, 3
SLOW_S, TIMEOUT_S = 0.6, 0.25


class ScriptedServer:
    def __init__(self):
        self.plans: dict[str, list[str]] = {}
        self.log: list[dict] = []  # one entry per request: row, action, arrival, departure, auth, body
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.script = None  # row -> plan, for rows a test cannot name in advance

    def next_action(self, row: str) -> str:
        with self.lock:
            if row not in self.plans and self.script is not None:
                self.plans[row] = self.script(row)
            plan = self.plans.get(row, ["ok"])
            return plan.pop(0) if len(plan) > 1 else plan[0]

    def requests_for(self, row: str) -> list[dict]:
        return [e for e in self.log if e["row"] == row]


def make_handler(server: ScriptedServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def send(self, status: int, body: bytes, headers: dict | None = None):
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def do_POST(self):
            arrival = time.monotonic()
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            row = request["messages"][-1]["content"]
            action = server.next_action(row)
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            entry = {"row": row, "action": action, "arrival": arrival, "auth": self.headers.get("Authorization"),
                     "body": request}
            with server.lock:  # logged on arrival: a client never sees a reply before its request is logged
                server.log.append(entry)
            try:
                self.act(action, row, request)
            finally:
                with server.lock:
                    server.in_flight -= 1
                    entry["departure"] = time.monotonic()

        def act(self, action: str, row: str, request: dict):
            kind, _, arg = action.partition(":")
            if kind == "429":
                self.send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": arg or "0"})
            elif kind == "500":
                self.send(500, b'{"error": {"message": "boom"}}')
            elif kind == "echo-auth-500":  # a careless server that puts the request's key in its error text
                self.send(500, json.dumps({"error": {"message": f"bad {self.headers['Authorization']}"}}).encode())
            elif kind == "400":
                self.send(400, b'{"error": {"message": "bad request"}}')
            elif kind == "malformed":
                self.send(200, b'{"id": "x", "choices": [')
            elif kind == "nochoices":
                self.send(200, b'{"id": "x", "object": "chat.completion"}')
            else:
                time.sleep(SLOW_S if kind == "slow" else float(arg or 0))
                self.send(200, json.dumps(completion(f"echo {row} seed={request['seed']}")).encode())

    return Handler


def completion(text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}


@contextlib.contextmanager
def serving(scripted: ScriptedServer, handler):
    """`scripted` served on a free loopback port by `handler` while inside; its url set."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    scripted.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield scripted
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server():
    scripted = ScriptedServer()
    with serving(scripted, make_handler(scripted)):
        yield scripted


def config(url: str, **overrides) -> OpenAIConfig:
    fields = dict(base_url=url, model="scripted", api_key_env=None, max_concurrency=4, timeout_s=TIMEOUT_S,
                  max_retries=5, backoff_base_s=0.01, backoff_max_s=0.05)
    return OpenAIConfig(**(fields | overrides))


def convs(*rows: str) -> list[list[dict]]:
    return [[{"role": "system", "content": "be brief"}, {"role": "user", "content": r}] for r in rows]


def test_replies_come_back_in_order_with_concurrency(server):
    rows = [f"r{i}" for i in range(8)]
    for i, r in enumerate(rows):  # early rows answer last, so completion order is the reverse of row order
        server.plans[r] = [f"delay:{0.05 * (8 - i) / 8}"]
    backend = OpenAIBackend(config(server.url))
    assert backend.generate(convs(*rows), Sampling(0.0, 16, 3)) == [f"echo {r} seed=3" for r in rows]
    assert server.max_in_flight > 1
    sent = server.log[0]["body"]
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["seed"]) == ("scripted", 0.0, 16, 3)
    assert server.log[0]["auth"] == "Bearer EMPTY"  # api_key_env=None sends the placeholder


def test_faults_are_retried_by_reason_until_every_row_is_answered(server):
    server.plans = {"a": ["429:0.2", "ok"], "b": ["500", "500", "ok"], "c": ["slow", "ok"],
                    "d": ["malformed", "nochoices", "ok"], "e": ["429:0", "500", "slow", "malformed", "ok"]}
    backend = OpenAIBackend(config(server.url, backoff_max_s=1.0))
    replies = backend.generate_detailed(convs(*"abcde"), Sampling())
    assert [r.text for r in replies] == [f"echo {r} seed=0" for r in "abcde"]
    assert [r.attempts for r in replies] == [2, 3, 2, 3, 5]
    usage = backend.usage()
    assert usage["retries"] == {"429": 2, "5xx": 3, "timeout": 2, "connection": 0, "malformed": 3}
    assert (usage["requests"], usage["failures"]) == (15, 0)
    first, second = server.requests_for("a")
    assert second["arrival"] - first["departure"] >= 0.2  # Retry-After honoured


def test_retry_after_is_capped_by_backoff_max(server):
    server.plans = {"a": ["429:30", "ok"]}
    start = time.monotonic()
    assert OpenAIBackend(config(server.url, backoff_max_s=0.1)).generate(convs("a"), Sampling()) == ["echo a seed=0"]
    assert time.monotonic() - start < 5


def test_a_row_that_always_fails_is_counted_and_the_others_answered(server):
    server.plans = {"bad": ["500"]}
    backend = OpenAIBackend(config(server.url, max_retries=2))
    replies = backend.generate_detailed(convs("x", "bad", "y"), Sampling())
    assert [r.text for r in replies] == ["echo x seed=0", None, "echo y seed=0"]
    assert "5xx" in replies[1].error and "boom" in replies[1].error and replies[1].attempts == 3
    assert len(server.requests_for("bad")) == 3
    usage = backend.usage()
    assert (usage["failures"], usage["retries"]["5xx"]) == (1, 2)
    # The Backend protocol: None for the failed row, its error kept for the manifest.
    assert backend.generate(convs("x", "bad", "y"), Sampling()) == ["echo x seed=0", None, "echo y seed=0"]
    assert "boom" in backend.errors[-1]


def test_client_errors_are_not_retried(server):
    server.plans = {"q": ["400"]}
    backend = OpenAIBackend(config(server.url))
    [reply] = backend.generate_detailed(convs("q"), Sampling())
    assert reply.text is None and "400" in reply.error and reply.attempts == 1
    assert len(server.requests_for("q")) == 1


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend(config(f"http://127.0.0.1:{port}/v1", max_retries=2))
    [reply] = backend.generate_detailed(convs("a"), Sampling())
    assert reply.text is None and reply.error.startswith("connection")
    assert backend.usage()["retries"]["connection"] == 2


def test_cache_answers_a_rerun_without_requests(server, tmp_path):
    server.plans = {"bad": ["500"]}
    cfg = config(server.url, cache_dir=str(tmp_path / "cache"), max_retries=1)
    batch = convs("a", "b", "bad", "a")
    first = OpenAIBackend(cfg).generate_detailed(batch, Sampling(0.7))
    assert [r.text for r in first] == ["echo a seed=0", "echo b seed=0", None, "echo a seed=1"]  # repeats get seed + k
    before = len(server.log)
    rerun = OpenAIBackend(cfg)
    again = rerun.generate_detailed(batch, Sampling(0.7))
    assert [r.text for r in again] == [r.text for r in first]
    assert [r.cached for r in again] == [True, True, False, True]
    assert [e["row"] for e in server.log[before:]] == ["bad", "bad"]  # only the failed row is sent again
    assert (rerun.usage()["cache_hits"], rerun.usage()["requests"]) == (3, 2)
    OpenAIBackend(cfg).generate(convs("a"), Sampling(0.7, seed=5))  # other sampling: another request
    assert server.log[-1]["row"] == "a" and server.log[-1]["body"]["seed"] == 5
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_the_api_key_is_sent_but_stored_and_reported_nowhere(server, tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("DALIGN_TEST_KEY", secret)
    server.plans = {"leak": ["echo-auth-500"]}
    cfg = config(server.url, api_key_env="DALIGN_TEST_KEY", cache_dir=str(tmp_path), max_retries=1)
    backend = OpenAIBackend(cfg)
    replies = backend.generate_detailed(convs("a", "leak"), Sampling())
    assert replies[1].text is None
    assert {e["auth"] for e in server.log} == {f"Bearer {secret}"}  # sent, and echoed back by the "leak" row
    texts = [json.dumps(backend.usage()), repr(cfg), repr(backend), cfg.model_dump_json()]
    texts += [r.error or "" for r in replies] + backend.errors
    cache_files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(cache_files) == 1  # row "a"
    texts += [p.read_text() for p in cache_files]
    assert not any(secret in t for t in texts)


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("DALIGN_TEST_KEY", raising=False)
    with pytest.raises(BackendError, match="DALIGN_TEST_KEY"):
        OpenAIBackend(config("http://127.0.0.1:9/v1", api_key_env="DALIGN_TEST_KEY"))


def test_token_usage_is_summed_over_answered_requests(server):
    server.plans = {"b": ["500", "ok"]}  # a failed attempt reports no usage
    backend = OpenAIBackend(config(server.url))
    backend.generate(convs("a", "b", "c"), Sampling())
    usage = backend.usage()
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3 * PROMPT_TOKENS, 3 * COMPLETION_TOKENS)


def test_request_limit_holds_a_request_until_the_window_frees():
    limiter = _RateLimiter(rpm=2, tpm=None)
    limiter.acquire(1), limiter.acquire(1)
    third = threading.Thread(target=limiter.acquire, args=(1,))
    third.start()
    third.join(0.4)
    assert third.is_alive()  # a third request within the minute waits
    limiter.window[0][0] -= 60  # as if the first request were a minute old
    third.join(2)
    assert not third.is_alive() and len(limiter.window) == 2


def test_token_limit_frees_tokens_when_usage_settles_below_the_estimate(server):
    limiter = _RateLimiter(rpm=None, tpm=100)
    first = limiter.acquire(80)
    second = threading.Thread(target=limiter.acquire, args=(50,))
    second.start()
    second.join(0.4)
    assert second.is_alive()
    limiter.settle(first, 20)  # the server counted fewer tokens than estimated
    second.join(2)
    assert not second.is_alive()
    backend = OpenAIBackend(config(server.url, requests_per_minute=100, tokens_per_minute=10_000))
    assert backend.generate(convs("a", "b"), Sampling()) == ["echo a seed=0", "echo b seed=0"]


def test_config_is_strict():
    with pytest.raises(ValidationError, match="api_key"):
        OpenAIConfig(base_url="http://x/v1", model="m", api_key="sk-nope")
    with pytest.raises(ValidationError, match="max_concurrency"):
        OpenAIConfig(base_url="http://x/v1", model="m", max_concurrency="4")
    with pytest.raises(ValidationError, match="backoff_base_s"):
        OpenAIConfig(base_url="http://x/v1", model="m", backoff_base_s=5, backoff_max_s=1)


def test_a_stage_against_a_faulty_server_accounts_for_every_row(server, world_tokenizer, tmp_path):
    """Dialogue generation with the teacher behind a server that answers 429 with Retry-After,
    500, too slowly, and malformed JSON before answering, and that never answers some rows."""
    from dalign.config import DialoguesConfig
    from dalign.generate import run_dialogues
    from dalign.world.roles import WorldUser

    # The timeout is generous next to the other tests' so that a loaded machine does not turn a
    # plain answer into one more timeout; "ok:3" is the reply that comes too late.
    faults = ["429:0.05", "500", "ok:3", "malformed"]
    doomed = lambda row: sum(map(ord, row)) % 5 == 0  # noqa: E731  (these rows always get a 500)
    server.script = lambda row: ["500"] if doomed(row) else [faults[sum(map(ord, row)) % 4], "ok"]
    cfg = DialoguesConfig(n_dialogues=12, max_turns=2, chunk_size=4, max_tokens=4096)
    teacher_cfg = config(server.url, max_retries=2, timeout_s=1.5, cache_dir=str(tmp_path / "cache"))
    teacher = OpenAIBackend(teacher_cfg, name="teacher")
    summary = run_dialogues(cfg, world_tokenizer, WorldUser(), teacher, tmp_path / "a")
    dropped = summary["rows"]["dropped"]
    assert summary["rows"]["kept"] + sum(dropped.values()) == 12
    usage = teacher.usage()
    assert dropped.get("teacher_failed", 0) == usage["failures"] > 0  # each failed dialogue fails at one answer
    assert all(usage["retries"][r] > 0 for r in ("429", "5xx", "timeout", "malformed"))
    answered = {e["row"] for e in server.log if e["action"] == "ok"}
    # A rerun into a fresh folder asks the server only what it never answered.
    before = len(server.log)
    rerun = OpenAIBackend(teacher_cfg, name="teacher")
    again = run_dialogues(cfg, world_tokenizer, WorldUser(), rerun, tmp_path / "b")
    assert again["rows"] == summary["rows"]
    assert not {e["row"] for e in server.log[before:]} & answered
    assert rerun.usage()["cache_hits"] > 0
