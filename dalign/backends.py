"""The one interface behind which every model role sits: a batch of conversations in, texts out.

The teacher, the user simulator, the judge, ensemble members and the student being
evaluated are all `Backend`s. The offline world implements it procedurally; a local
transformers model and an OpenAI-compatible server implement it the same way, so a
recipe swaps one for another without touching the stage that calls it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = list[Message]
# A generated dialogue starts from the system message TOPIC_PREFIX + its seed topic; the user
# simulators (the offline world's and the prompted one) read the topic back from it.
TOPIC_PREFIX = "Topic: "


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling parameters."""

    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()  # a reply ends before the first of these strings


Samplings = Sampling | Sequence[Sampling]  # one for the whole batch, or one per row


def per_row(sampling: Samplings, n: int) -> list[Sampling]:
    """One Sampling per row: a single one is shared by all n rows; a sequence must have n."""
    if isinstance(sampling, Sampling):
        return [sampling] * n
    rows = list(sampling)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} sampling settings for {n} conversations: give one, or one per conversation")
    return rows


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first stop string (servers differ on whether they keep it)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text


class Backend(Protocol):
    name: str

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings) -> list[str | None]:
        """One reply per conversation, in order. Implementations may batch or run requests
        concurrently inside; callers pass whole batches so that they can. `sampling` is one
        setting for every row or one per row (`per_row`): a temperature, a length or a seed
        of its own for each request.

        A reply is None when a remote backend gave up on that row after its retries; the
        stage counts the row as failed (a rerun asks again) rather than losing it."""
        ...


def conversation_rng(conversation: Conversation, *salt: object) -> random.Random:
    """A generator seeded by the conversation's text, so replies are reproducible per row
    whatever the batch composition or the order rows are processed in after a resume."""
    blob = json.dumps([conversation, salt], sort_keys=True).encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))
