"""Roles played by a general chat model through prompt templates: the user simulator and the
MT-Bench judge, when a server or a local model plays them (dalign.roles).

Each wraps any Backend (an OpenAI-compatible server, a local model) and turns the
conversation a stage hands it into one request written from a template in dalign/prompts/,
so the stages call these roles exactly as they call the offline world's.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Sequence

from dalign.backends import TOPIC_PREFIX, Backend, Conversation, Sampling, Samplings

REFERENCE_PREFIX = "Reference answer:\n"  # a system message the evaluation adds for math, reasoning, coding


def template(name: str) -> str:
    return (files("dalign") / "prompts" / name).read_text().strip()


def transcript(messages: Sequence[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages if m["role"] != "system")


class PromptedUser:
    """UltraChat's user simulator: opens a dialogue on the seed topic, then asks follow-ups."""

    def __init__(self, model: Backend, name: str | None = None):
        self.model, self.name = model, name or f"user-simulator({model.name})"
        self.opening, self.followup = template("user_opening.txt"), template("user_followup.txt")

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str | None]:
        requests = []
        for conv in conversations:
            turns = [m for m in conv if m["role"] != "system"]
            if turns:
                text = self.followup.format(transcript=transcript(turns))
            else:
                topic = conv[0]["content"].removeprefix(TOPIC_PREFIX) if conv else ""
                text = self.opening.format(topic=topic)
            requests.append([{"role": "user", "content": text}])
        return [None if r is None else _unquote(r) for r in self.model.generate(requests, sampling)]


class PromptedJudge:
    """MT-Bench single-answer grading: the last assistant turn is graded 1-10, with the earlier
    turns shown as context and the reference answer shown when the conversation carries one."""

    def __init__(self, model: Backend, name: str | None = None):
        self.model, self.name = model, name or f"judge({model.name})"
        self.text = template("judge_single.txt")

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str | None]:
        return self.model.generate([[{"role": "user", "content": self.request(c)}] for c in conversations], sampling)

    def request(self, conv: Conversation) -> str:
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError("a judged conversation ends with the answer to grade")
        refs = [m["content"].removeprefix(REFERENCE_PREFIX) for m in conv
                if m["role"] == "system" and m["content"].startswith(REFERENCE_PREFIX)]
        turns = [m for m in conv if m["role"] != "system"]
        earlier = turns[:-2]
        context = f"[The conversation so far]\n{transcript(earlier)}\n[End of the conversation so far]\n\n" if earlier else ""
        reference = f"[A reference answer]\n{refs[-1]}\n[End of the reference answer]\n\n" if refs else ""
        return self.text.format(context=context, question=turns[-2]["content"], reference=reference,
                                answer=turns[-1]["content"])


def _unquote(text: str) -> str:
    """Chat models often wrap a written message in quotes despite being asked not to."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
