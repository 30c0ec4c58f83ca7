"""Stage 2b: the teacher rates every completion of a prompt together, UltraFeedback style.

The completions are shown in a shuffled order (seeded per prompt), numbered; the teacher
rates each 1-5 on instruction-following, honesty, truthfulness and helpfulness, with a
rationale. The reply is parsed strictly. A reply that does not parse keeps its raw text,
is asked again up to `retries` times, and is then counted as failed: never guessed.
A completion's score is the mean of its aspect ratings, N/A skipped.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from dalign.backends import Backend, Sampling
from dalign.data import write_rows
from dalign.judging import ASPECTS
from dalign.parallel import is_main
from dalign.parts import in_parts
from dalign.world.task import Template

TEMPLATE = (files("dalign") / "prompts" / "rate.txt").read_text()
_BLOCK = "[Response {n}]\n{text}\n[End of response {n}]"
_ASPECT_NAMES = {a: a.replace("_", "-").capitalize() for a in ASPECTS}


class RatingParseError(ValueError):
    """A rating reply that does not give every aspect of every response."""


def instruction_text(prompt: list[dict]) -> str:
    """A single-turn prompt is its user message; longer ones are shown as a transcript."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def rating_prompt(prompt: list[dict], texts: Sequence[str]) -> list[dict]:
    blocks = "\n\n".join(_BLOCK.format(n=i + 1, text=t) for i, t in enumerate(texts))
    return [{"role": "user", "content": TEMPLATE.format(instruction=instruction_text(prompt), responses=blocks)}]


def read_rating_prompt(text: str) -> tuple[str, list[str]] | None:
    """The inverse of `rating_prompt`, for raters that read the prompt as text (the world's)."""
    slots = Template(TEMPLATE.strip()).parse(text.strip())
    if slots is None:
        return None
    found = re.findall(r"\[Response (\d+)\]\n(.*?)\n\[End of response \1\]", slots["responses"], flags=re.DOTALL)
    return slots["instruction"], [body for _, body in found]


def parse_ratings(text: str, n: int) -> list[dict]:
    """The reply's last n blocks, 'Response 1' to 'Response n' in order, each with the four
    aspects (1-5 or N/A) and a rationale. Earlier blocks, and an aspect line that a later line
    of the block gives again, are the rater quoting a response that carries a fake rating: the
    template asks for the ratings last (dalign.judging.parse_judgment says why that rule)."""
    blocks = re.split(r"^Response (\d+)\s*$", text.strip(), flags=re.MULTILINE)
    numbers, bodies = [int(b) for b in blocks[1::2]][-n:], blocks[2::2][-n:]
    if numbers != list(range(1, n + 1)):
        raise RatingParseError(f"expected the reply to end with responses 1..{n} in order, found {numbers}")
    ratings = []
    for k, body in zip(numbers, bodies):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*?)\s*$", body, flags=re.MULTILINE))
        aspects = {}
        for aspect, label in _ASPECT_NAMES.items():
            value = fields.get(label)
            if value not in ("1", "2", "3", "4", "5", "N/A"):
                raise RatingParseError(f"response {k}: {label} is {value!r}, expected 1-5 or N/A")
            aspects[aspect] = None if value == "N/A" else int(value)
        given = [v for v in aspects.values() if v is not None]
        if not given:
            raise RatingParseError(f"response {k}: every aspect is N/A")
        ratings.append({"ratings": aspects, "rationale": fields.get("Rationale", ""), "score": sum(given) / len(given)})
    return ratings


def rate_prompts(rows: list[dict], rater: Backend, retries: int, seed: int) -> tuple[list[dict], Counter]:
    """Rate each row's completions in place; returns rows and counts of retries and failures."""
    # A completion whose generation failed (text None) or came back empty is not shown and keeps no
    # score: an empty reply is a server's fault more often than a model's answer, rating it would
    # pay for a score that says nothing of the model, and an empty pair side is not a valid row.
    shown = [[k for k, c in enumerate(row["completions"]) if (c["text"] or "").strip()] for row in rows]
    orders = [random.Random(f"{seed}:{row['prompt_id']}").sample(ks, len(ks)) for row, ks in zip(rows, shown)]
    requests = [rating_prompt(row["prompt"], [row["completions"][i]["text"] for i in order])
                for row, order in zip(rows, orders)]
    pending, counts, raws = [i for i in range(len(rows)) if orders[i]], Counter(), [[] for _ in rows]
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            counts["retries"] += len(pending)
        # Retries sample, so that a rater that failed once does not repeat the same reply.
        replies = rater.generate([requests[i] for i in pending], Sampling(0.0 if attempt == 0 else 0.7, 2048, seed + attempt))
        still = []
        for i, reply in zip(pending, replies):
            raws[i].append(reply)
            try:
                if reply is None:
                    raise RatingParseError("the rater gave no reply (its backend failed after retries)")
                parsed = parse_ratings(reply, len(orders[i]))
            except RatingParseError as err:
                rows[i]["rating_error"] = str(err)
                still.append(i)
                continue
            rows[i].pop("rating_error", None)
            for shown, original in enumerate(orders[i]):
                rows[i]["completions"][original].update(parsed[shown])
        pending = still
    for i, row in enumerate(rows):
        row["rating_raw"], row["rating_order"] = raws[i], orders[i]
        if i in pending or not orders[i]:
            counts["failed"] += 1
            for c in row["completions"]:
                c.update({"ratings": None, "rationale": None, "score": None})
        else:
            for c in row["completions"]:
                if not (c["text"] or "").strip():
                    counts["not_rated:" + ("failed_completion" if c["text"] is None else "empty_completion")] += 1
                    c.update({"ratings": None, "score": None, "rationale": "not rated: its generation failed"
                              if c["text"] is None else "not rated: the answer is empty"})
    return rows, counts


def run_rating(rows: list[dict], rater: Backend, retries: int, chunk_size: int, seed: int, out: Path) -> dict:
    def make_chunk(start: int, end: int) -> tuple[list[dict], Counter]:
        return rate_prompts([dict(r) for r in rows[start:end]], rater, retries, seed)

    rated, counts = in_parts(len(rows), chunk_size, out, make_chunk)
    if is_main():
        write_rows(out / "ratings.jsonl", rated)
    return {"rows": {"kept": len(rated) - counts["failed"], "dropped": {"rating_failed": counts["failed"]}},
            "retries": counts["retries"], "rater": rater.name,
            "completions_not_rated": {k.split(":")[1]: v for k, v in counts.items() if k.startswith("not_rated:")}}


def stage(recipe, out: Path, inputs: dict[str, Path]) -> dict:
    """The `ratings` stage: roles.rater rates every prompt's completions."""
    from dalign import roles
    from dalign.data import read_rows

    cfg = recipe.rating
    rater = roles.backend(recipe, "rater", inputs, out)
    facts = run_rating(read_rows(inputs["completions"] / "completions.jsonl"), rater, cfg.retries, cfg.chunk_size,
                       cfg.seed, out)
    return {"seeds": {"shown_order": cfg.seed}, **facts, **roles.usage([rater])}
