"""A Backend over any OpenAI-compatible chat-completions server (OpenAI, vLLM, TGI, llama.cpp).

One request per conversation, `max_concurrency` in flight, replies in the caller's order.
The client's own retries are off so that every retry is ours and counted: 429, 5xx,
timeouts, connection errors and malformed replies are retried with exponential backoff and
full jitter, waiting what a `Retry-After` header asks (capped at `backoff_max_s`). Any other
4xx fails at once: the request itself is wrong and resending it cannot help.

Failure accounting: `generate_detailed` returns one `Reply` per row (text or error, attempts,
cached). `generate`, the `Backend` protocol, returns the texts with None for each row that
failed after its retries, so the calling stage counts those rows as failed and keeps the
rest; the errors are counted in `usage()` and the first few kept in `errors`. Answered rows
are cached, so a rerun resends only the failures.

Successful replies are cached under `cache_dir`, one JSON file per request named by the
sha256 of (base_url, model, messages, sampling), written atomically: a rerun or resumed run
sends no request already answered. The API key is read from the environment variable named
in the config and never stored, logged or put in an error message (server error texts are
scrubbed of it too, in case a server echoes the request headers).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import openai

from dalign.backends import Conversation, Sampling, Samplings, cut_at_stop, per_row
from dalign.config import OpenAIConfig  # noqa: F401  (declared with the other configs)
from dalign.data import write_json

RETRY_REASONS = ("429", "5xx", "timeout", "connection", "malformed")
NO_KEY = "EMPTY"  # what keyless servers (vLLM, llama.cpp) expect in the bearer header


class BackendError(RuntimeError):
    """Requests that failed after all retries, or a backend that cannot be built."""

    def __init__(self, message: str, replies: Sequence["Reply"] = ()):
        super().__init__(message)
        self.replies = list(replies)


@dataclass(frozen=True)
class Reply:
    """One row's outcome: text, or error after `attempts` requests (0 when served from the cache)."""

    text: str | None
    error: str | None = None
    attempts: int = 0
    cached: bool = False


class _Retryable(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class _RateLimiter:
    """Sliding 60 s window over the requests started and their tokens; a request waits until both fit."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm, self.window, self.lock = rpm, tpm, deque(), threading.Lock()

    def acquire(self, tokens: int) -> list:
        while True:
            with self.lock:
                now = time.monotonic()
                while self.window and now - self.window[0][0] >= 60:
                    self.window.popleft()
                used = sum(t for _, t in self.window)
                # An empty window always admits, so one request above the whole tpm still goes.
                if (self.rpm is None or len(self.window) < self.rpm) and \
                        (self.tpm is None or not self.window or used + tokens <= self.tpm):
                    entry = [now, tokens]
                    self.window.append(entry)
                    return entry
                wait = 60 - (now - self.window[0][0])
            time.sleep(min(max(wait, 0.01), 0.25))  # re-check often: settle() may free tokens early

    def settle(self, entry: list, tokens: int) -> None:
        with self.lock:  # the estimate is replaced by what the server counted
            entry[1] = tokens


def _retry_after(response) -> float | None:
    """Seconds asked by Retry-After (or OpenAI's retry-after-ms); None when absent or an HTTP date."""
    for header, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return max(0.0, float(response.headers[header]) / scale)
        except (KeyError, ValueError, TypeError):
            continue
    return None


class OpenAIBackend:
    def __init__(self, config: OpenAIConfig, name: str | None = None, cache_identity: str | None = None):
        """`cache_identity`: what the cache keys name instead of base_url, for a server whose
        address changes from run to run (one dalign starts itself on a free port)."""
        self.config, self.name = config, name or config.model
        self._identity = cache_identity or config.base_url
        key = NO_KEY
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise BackendError(f"environment variable {config.api_key_env} is not set or empty; "
                                   f"it must hold the API key for {config.base_url}")
        self._secret = key if key != NO_KEY else None  # kept only to scrub it from error texts
        self._client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.timeout_s, max_retries=0)
        self._limiter = None
        if config.requests_per_minute or config.tokens_per_minute:
            self._limiter = _RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._counts, self._lock = Counter(), threading.Lock()
        self.errors: list[str] = []  # the first failures' messages (key scrubbed), for the manifest

    @classmethod
    def for_stage(cls, config: OpenAIConfig, stage_dir: Path, name: str,
                  cache_identity: str | None = None) -> "OpenAIBackend":
        """A backend for one stage of a run: its replies are cached in the stage's folder unless the
        config names a cache, so a killed stage, rerun, pays for no reply twice."""
        if config.cache_dir is None:
            config = config.model_copy(update={"cache_dir": str(Path(stage_dir) / "responses")})
        return cls(config, name, cache_identity)

    def __repr__(self) -> str:
        return f"OpenAIBackend(name={self.name!r}, model={self.config.model!r}, base_url={self.config.base_url!r})"

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str | None]:
        replies = self.generate_detailed(conversations, sampling)
        for r in replies:
            if r.error is not None and len(self.errors) < 20:
                self.errors.append(r.error)
        return [r.text for r in replies]

    def generate_detailed(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[Reply]:
        bodies, repeats = [], Counter()
        for conv, sampling in zip(conversations, per_row(sampling, len(conversations))):
            # The k-th repeat of a conversation in one call is sent with seed + k, so repeated rows
            # are independent samples (as with LocalModel) and do not share one cache entry.
            text = json.dumps(conv, sort_keys=True)
            body = {"model": self.config.model, "messages": list(conv), "temperature": sampling.temperature,
                    "max_tokens": sampling.max_new_tokens, "seed": sampling.seed + repeats[text]}
            repeats[text] += 1
            if self.config.top_p is not None:
                body["top_p"] = self.config.top_p
            stop = list(sampling.stop) or self.config.stop
            if stop:
                body["stop"] = stop
            bodies.append(body)
        with ThreadPoolExecutor(self.config.max_concurrency) as pool:
            return list(pool.map(self._answer, bodies))

    def usage(self) -> dict:
        """Counts since this backend was built, for a stage's manifest."""
        with self._lock:
            c = dict(self._counts)
        return {"backend": self.name, "model": self.config.model, "base_url": self.config.base_url,
                "requests": c.get("requests", 0), "cache_hits": c.get("cache_hits", 0), "failures": c.get("failures", 0),
                "retries": {r: c.get(f"retry_{r}", 0) for r in RETRY_REASONS},
                "prompt_tokens": c.get("prompt_tokens", 0), "completion_tokens": c.get("completion_tokens", 0)}

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._counts.update(amounts)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _answer(self, body: dict) -> Reply:
        key = hashlib.sha256(json.dumps({"base_url": self._identity, **body}, sort_keys=True).encode()).hexdigest()
        cached = self._cache_get(key)
        if cached is not None:
            self._count(cache_hits=1)
            return Reply(cached, attempts=0, cached=True)
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            try:
                text = self._attempt(body)
            except _Retryable as err:
                error = self._scrub(f"{err.reason}: {err}")
                if attempt == cfg.max_retries:
                    break
                self._count(**{f"retry_{err.reason}": 1})
                cap = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
                time.sleep(random.uniform(0, cap) if err.retry_after is None else min(err.retry_after, cfg.backoff_max_s))
                continue
            except openai.APIStatusError as err:
                self._count(failures=1)
                return Reply(None, self._scrub(f"http {err.status_code} (not retried): {err}"), attempt + 1)
            self._cache_put(key, text)
            return Reply(text, attempts=attempt + 1)
        self._count(failures=1)
        return Reply(None, f"{error} (gave up after {cfg.max_retries + 1} attempts)", cfg.max_retries + 1)

    def _attempt(self, body: dict) -> str:
        """One request; raises _Retryable for what a retry may cure, APIStatusError for what it cannot."""
        estimate = sum(len(str(m.get("content", ""))) for m in body["messages"]) // 4 + body["max_tokens"]
        entry = self._limiter.acquire(estimate) if self._limiter else None
        self._count(requests=1)
        try:
            completion = self._client.chat.completions.create(**body)
        except openai.APITimeoutError as err:  # a subclass of APIConnectionError, so caught first
            raise _Retryable("timeout", str(err)) from err
        except openai.APIConnectionError as err:
            raise _Retryable("connection", str(err)) from err
        except openai.APIStatusError as err:
            if err.status_code == 429 or err.status_code >= 500:
                raise _Retryable("429" if err.status_code == 429 else "5xx", str(err), _retry_after(err.response)) from err
            raise
        except (ValueError, openai.APIResponseValidationError) as err:  # a body the client could not decode
            raise _Retryable("malformed", f"unparseable response: {err}") from err
        try:  # a non-JSON content type comes back as a str; a JSON without choices as a bare model
            text = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as err:
            raise _Retryable("malformed", f"response without choices[0].message: {str(completion)[:200]}") from err
        if not isinstance(text, str):
            raise _Retryable("malformed", "response message has no text content")
        usage = getattr(completion, "usage", None)
        prompt, reply = (getattr(usage, "prompt_tokens", 0) or 0), (getattr(usage, "completion_tokens", 0) or 0)
        self._count(prompt_tokens=prompt, completion_tokens=reply)
        if entry is not None and usage:
            self._limiter.settle(entry, prompt + reply)
        return cut_at_stop(text, body.get("stop") or ())  # some servers keep the stop string

    def _cache_path(self, key: str) -> Path:
        return Path(self.config.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        if self.config.cache_dir is None:
            return None
        try:
            return json.loads(self._cache_path(key).read_text())["text"]
        except (OSError, ValueError, KeyError):  # absent, or torn by a crash: ask the server again
            return None

    def _cache_put(self, key: str, text: str) -> None:
        if self.config.cache_dir is None:
            return
        write_json(self._cache_path(key), {"model": self.config.model, "text": text})
