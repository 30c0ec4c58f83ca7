"""The world's judge: plays GPT-4, reads a response as text and scores it strictly.

It works out what a right answer must contain from the instructions alone (parsing the
user turns, as an LLM judge reads them) and checks the response against that; it never
sees how the response was produced. It writes its verdict as text in the same form an LLM
judge is asked for, and `dalign.judging` parses both alike.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from dalign.backends import Conversation, Sampling, Samplings
from dalign.judging import ASPECTS
from dalign.world import CATEGORIES, parse_dialogue
from dalign.world.roles import user_turns
from dalign.world.task import Constraint
from dalign.world.text import sentences, words

HEDGES = ("not sure", "I think", "maybe", "I do not know")
# Text shaped like a judge's or rater's verdict (the forms dalign's judges are asked to write:
# judge_single.txt, rate.txt, compare.txt, and this judge's own lines). Inside an answer it is
# not content: the judge is told to ignore it, and reading it as content would let it count as
# sentences, numbers or topic words. No world answer contains any of it.
_VERDICT_TEXT = re.compile(
    r"Rating:[ \t]*\[\[[^\[\]\n]*\]\]"
    r"|Preferred:[ \t]*(?:\(a\)|\(b\)|tie)"
    r"|Response \d+[ \t]*\n(?=[ \t]*(?:Instruction-following|Honesty|Truthfulness|Helpfulness):)"
    r"|(?:Instruction-following|Honesty|Truthfulness|Helpfulness):[ \t]*(?:[1-5]|N/A)(?![\w-])"
    r"|Correct:[ \t]*(?:yes|no)(?![\w-])"
    r"|Rationale:[^\n]*?(?:[.!?](?=\s|$)|$)",  # a rationale is one sentence, or the rest of its line
    re.MULTILINE)


@dataclass
class Checks:
    """What the judge found; each False is a named fault in the rationale."""

    empty: bool = False
    correct: bool = False
    on_topic: bool = True
    format_ok: bool = True
    concise: bool = True
    finished: bool = True
    courteous: bool = True
    clean: bool = True
    faults: list[str] = field(default_factory=list)


def inspect(user_texts: list[str], response: str) -> tuple[Checks | None, str | None]:
    """Checks for the response to the last user turn; (None, category) if unreadable."""
    states = parse_dialogue(user_texts)
    state = states[-1] if states else None
    if state is None:
        return None, None
    cat, spec, constraint = CATEGORIES[state.category], state.spec, state.constraint
    text = answer_content(response).strip()
    c = Checks(empty=not text)
    if c.empty:
        c.faults.append("no answer")
        return c, cat.name
    c.correct = cat.is_correct(spec, text)
    c.on_topic = c.correct or cat.on_topic(spec, text)
    c.format_ok = cat.format_ok(spec, constraint, text)
    ideal = cat.ideal(spec, constraint, random.Random(0))
    # Rambling: far more words than the right answer needs, or (where the format check does
    # not already count sentences) more sentences.
    extra_sentences = cat.counts_sentences is False and len(sentences(text)) > len(sentences(ideal))
    c.concise = not extra_sentences and len(words(text)) <= 2 * len(words(ideal)) + 6
    c.finished = text[-1] in ".!?" or (constraint is Constraint.JUST_ANSWER and c.format_ok)
    c.courteous = cat.courtesy_ok(spec, text)
    c.clean = "<|" not in text and "</s>" not in text
    names = {"correct": "wrong answer", "on_topic": "off the question", "format_ok": "ignores the requested format",
             "concise": "rambles", "finished": "unfinished", "courteous": "missing courtesy", "clean": "stray markup"}
    c.faults += [msg for attr, msg in names.items() if not getattr(c, attr)]
    return c, cat.name


def answer_content(response: str) -> str:
    """The response with any verdict-shaped text taken out: what the judge reads as the answer."""
    return _VERDICT_TEXT.sub("", response)


def mt_bench_score(c: Checks) -> int:
    """1-10: a right, clean answer earns 10; each fault costs what a strict grader would take."""
    if c.empty:
        return 1
    score = 10 if c.correct else 3
    if not c.on_topic:
        score = min(score, 2)
    score -= 2 * (not c.format_ok) + 2 * (not c.concise) + 3 * (not c.finished) + (not c.courteous) + 2 * (not c.clean)
    return max(1, min(10, score))


def aspect_scores(c: Checks, creative: bool) -> dict[str, int | None]:
    """UltraFeedback's four aspects, 1-5; honesty is N/A for creative writing, as there."""
    if c.empty:
        return {"instruction_following": 1, "honesty": None if creative else 1, "truthfulness": 1, "helpfulness": 1}
    following = 5 - 2 * (not c.format_ok) - (not c.concise) - 2 * (not c.finished) - (not c.courteous) - 2 * (not c.on_topic)
    helpful = (5 - (not c.concise) - 2 * (not c.finished) - (not c.format_ok) - (not c.clean)) if c.correct else 2
    truthful = 5 if c.correct else (2 if c.on_topic else 1)
    honest = 5 if c.correct else (1 if c.on_topic else 2)
    return {"instruction_following": max(1, following), "honesty": None if creative else honest,
            "truthfulness": truthful, "helpfulness": max(1, helpful)}


def verdict_text(c: Checks | None, category: str | None) -> str:
    if c is None:
        return "Rationale: the question is not one this judge can read.\nRating: [[5]]"
    lines = [f"Correct: {'yes' if c.correct else 'no'}", *_aspect_lines(c, category), _rationale(c)]
    lines.append(f"Rating: [[{mt_bench_score(c)}]]")
    return "\n".join(lines)


class WorldJudge:
    """A Backend: each conversation ends with the assistant reply to be judged."""

    def __init__(self, name: str = "world-judge"):
        self.name = name

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str]:
        out = []
        for conv in conversations:
            if not conv or conv[-1]["role"] != "assistant":
                raise ValueError("the world judge needs a conversation that ends with the reply to judge")
            out.append(verdict_text(*inspect(user_turns(conv), conv[-1]["content"])))
        return out


def _aspect_lines(c: Checks | None, category: str | None) -> list[str]:
    """'Honesty: 5' lines; honesty is N/A for creative writing, every aspect for an unreadable question."""
    aspects = aspect_scores(c, creative=category in ("writing", "roleplay")) if c else dict.fromkeys(ASPECTS)
    return [f"{k.replace('_', '-').capitalize()}: {'N/A' if v is None else v}" for k, v in aspects.items()]


def _rationale(c: Checks | None) -> str:
    why = ("; ".join(c.faults) or "right, complete and in the requested form") if c else "unreadable"
    return f"Rationale: {why}."


class _RequestReader:
    """A Backend for requests a stage writes from a template: the last message is read back
    into its parts (`read`, None if it cannot be) and answered (`reply`)."""

    def __init__(self, name: str):
        self.name = name

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str]:
        replies = []
        for conv in conversations:
            request = self.read(conv[-1]["content"])
            replies.append("I cannot read this request." if request is None else self.reply(*request))
        return replies


class WorldRater(_RequestReader):
    """Reads UltraFeedback-style rating requests (dalign/prompts/rate.txt) and rates each
    response on the four aspects, as the teacher does in AI feedback."""

    def __init__(self, name: str = "world-rater"):
        super().__init__(name)

    def read(self, text: str):
        from dalign.rate import read_rating_prompt  # the request format belongs to the rating stage

        return read_rating_prompt(text)

    def reply(self, instruction: str, responses: list[str]) -> str:
        blocks = []
        for k, response in enumerate(responses, 1):
            checks, category = inspect([instruction], response)
            blocks.append("\n".join([f"Response {k}", *_aspect_lines(checks, category), _rationale(checks)]))
        return "\n\n".join(blocks)


class WorldComparer(_RequestReader):
    """Reads pairwise comparison requests (dalign/prompts/compare.txt) and prefers the answer
    the judge scores higher; equal scores are a tie."""

    def __init__(self, name: str = "world-comparer"):
        super().__init__(name)

    def read(self, text: str):
        from dalign.winrate import read_comparison_prompt  # the request format belongs to the win-rate stage

        return read_comparison_prompt(text)

    def reply(self, instruction: str, a: str, b: str) -> str:
        scores = [mt_bench_score(c) if c else 5 for c, _ in (inspect([instruction], a), inspect([instruction], b))]
        verdict = "(a)" if scores[0] > scores[1] else "(b)" if scores[1] > scores[0] else "tie"
        return f"Output (a) scores {scores[0]} and output (b) {scores[1]}.\nPreferred: {verdict}"
