"""The world's teacher and user simulator, as Backends.

The teacher plays the role GPT-3.5 played for UltraChat: it knows every answer, and it is
imperfect in stated, configurable ways (it rambles, ignores a format constraint, omits the
sign-off of a note, or gets the answer wrong, each at its own rate). Its rambling is a
habit, as a chat model's is: it always opens the padding with the same stock sentence, so a
student that learns the habit keeps it even under greedy decoding. That gap between the
teacher and the strict judge is what AI feedback and dDPO are there to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dalign.backends import TOPIC_PREFIX, Conversation, Sampling, Samplings, conversation_rng
from dalign.world import CATEGORIES, parse_dialogue
from dalign.world.task import Constraint

STOCK_PHRASE = "I hope this helps you."
FILLER = [
    STOCK_PHRASE, "There is a lot more one could say about this.", "Let me know if you have other questions.",
    "This is a common kind of question.", "It is always good to check such things twice.",
]
NOT_UNDERSTOOD = "I am sorry, I do not understand the question."


@dataclass(frozen=True)
class Flaws:
    """Rates at which the teacher departs from the ideal answer (each in [0, 1])."""

    ramble: float = 0.0
    ignore_format: float = 0.0
    skip_courtesy: float = 0.0
    error: float = 0.0


def user_turns(conversation: Conversation) -> list[str]:
    return [m["content"] for m in conversation if m["role"] == "user"]


class WorldTeacher:
    """Answers the last user turn of each conversation."""

    def __init__(self, flaws: Flaws = Flaws(), seed: int = 0, name: str = "world-teacher"):
        self.flaws, self.seed, self.name = flaws, seed, name

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str]:
        return [self.answer(c) for c in conversations]

    def answer(self, conversation: Conversation) -> str:
        states = parse_dialogue(user_turns(conversation))
        if not states or states[-1] is None:
            return NOT_UNDERSTOOD
        state = states[-1]
        rng = conversation_rng(conversation, "teacher", self.seed)
        cat, f = CATEGORIES[state.category], self.flaws
        text = cat.ideal(state.spec, state.constraint, rng)
        if rng.random() < f.error:
            text = cat.wrong(state.spec, state.constraint, rng)
        if rng.random() < f.ignore_format and (off := cat.flawed_format(state.spec, state.constraint, rng)):
            text = off
        if rng.random() < f.skip_courtesy and state.category == "writing":
            text = text.rsplit("\n", 1)[0]
        if rng.random() < f.ramble:
            more = rng.sample(FILLER[1:], rng.randint(1, 2))
            text = f"{text} {' '.join([STOCK_PHRASE, *more])}"
        return text


class WorldUser:
    """The user simulator: opens a dialogue from a seed topic, then asks follow-ups.

    A conversation starts with a system message 'Topic: <category> #<n>' (see
    `seed_topics`); the simulator writes the next user turn."""

    def __init__(self, seed: int = 0, constraint_rate: float = 0.5, name: str = "world-user"):
        self.seed, self.constraint_rate, self.name = seed, constraint_rate, name

    def generate(self, conversations: Sequence[Conversation], sampling: Samplings = Sampling()) -> list[str]:
        return [self.ask(c) for c in conversations]

    def ask(self, conversation: Conversation) -> str:
        rng = conversation_rng(conversation, "user", self.seed)
        turns = user_turns(conversation)
        if not turns:
            topic = conversation[0]["content"].removeprefix(TOPIC_PREFIX)
            cat = CATEGORIES[topic.split(" #")[0]]
            return cat.render(cat.sample(rng), rng, self._constraint(cat, rng))
        state = parse_dialogue(turns)[-1]  # turns is not empty here
        if state is None:
            return "Can you say that again?"
        cat = CATEGORIES[state.category]
        template, slots = cat.sample_followup(state.spec, rng)
        return template.render(slots) + self._constraint(cat, rng).value

    def _constraint(self, cat, rng) -> Constraint:
        choices = [c for c in cat.constraints if c is not Constraint.NONE]
        return rng.choice(choices) if choices and rng.random() < self.constraint_rate else Constraint.NONE


def seed_topics(n: int, seed: int, categories: Sequence[str] | None = None) -> list[str]:
    """n seed topics, cycling through the categories; '#k' makes each one distinct."""
    cats = list(categories or CATEGORIES)
    return [f"{TOPIC_PREFIX}{cats[i % len(cats)]} #{seed}-{i}" for i in range(n)]


def fresh_openings(per_category: int, seed: int, tag: str, exclude: set[str], strict: bool = True) -> list[tuple[str, str]]:
    """(category, first user turn) pairs never seen in `exclude` nor repeated; each one found
    is added to `exclude`, so several calls draw disjoint sets (training, feedback, test).

    A category whose prompts run out raises if `strict`, else yields fewer."""
    user, found = WorldUser(seed=seed), []
    for category in CATEGORIES:
        got = 0
        for j in range(20 * per_category + 1000):  # bounded: a small category can run out
            if got == per_category:
                break
            first = user.ask([{"role": "system", "content": f"{TOPIC_PREFIX}{category} #{tag}-{seed}-{j}"}])
            if first not in exclude:
                exclude.add(first)
                found.append((category, first))
                got += 1
        if got < per_category and strict:
            raise ValueError(f"cannot find {per_category} new {category} prompts: earlier stages already "
                             f"use nearly every {category} prompt the world can write")
    return found
