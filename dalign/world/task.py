"""What every category of world instruction provides, and the machinery they share.

A category renders a spec (a plain dict) into an instruction through phrasing templates,
and parses instruction text back into the spec. The judge and the teacher only ever see
text: they recover what was asked by parsing it, exactly as an LLM judge reads a prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from enum import Enum

from dalign.world.text import has_word, last_list, last_number, sentences


class Constraint(str, Enum):
    """A format constraint appended to an instruction; the judge checks it from the text."""

    NONE = ""
    ONE_SENTENCE = " Answer in one sentence."
    JUST_ANSWER = " Reply with just the answer."


@dataclass(frozen=True)
class State:
    """What the user has asked at some turn: category, spec and the format constraint."""

    category: str
    spec: dict
    constraint: Constraint


class Template:
    """A phrasing with {slots}; renders with str.format and parses back with a regex."""

    def __init__(self, text: str):
        self.text = text
        parts = re.split(r"\{(\w+)\}", text)
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.*?)" for i, p in enumerate(parts))
        self.regex = re.compile(pattern, re.DOTALL)

    def render(self, slots: dict) -> str:
        return self.text.format(**slots)

    def parse(self, text: str) -> dict | None:
        m = self.regex.fullmatch(text)
        return m.groupdict() if m else None


def split_constraint(text: str) -> tuple[str, Constraint]:
    for c in (Constraint.ONE_SENTENCE, Constraint.JUST_ANSWER):
        if text.endswith(c.value):
            return text[: -len(c.value)], c
    return text, Constraint.NONE


class Category:
    """A family of instructions. Subclasses fill in the spec logic; see each method's doc."""

    name: str = ""
    temperature: float = 0.0  # MT-Bench's sampling temperature for this category
    openings: list[Template] = []
    followups: list[Template] = []
    constraints: tuple[Constraint, ...] = (Constraint.NONE, Constraint.ONE_SENTENCE, Constraint.JUST_ANSWER)
    counts_sentences = False  # True where the instruction itself sets the number of sentences

    # --- spec <-> text --------------------------------------------------------------
    def sample(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def slots(self, spec: dict) -> dict:
        """The template slots of a spec (strings)."""
        raise NotImplementedError

    def from_slots(self, slots: dict) -> dict | None:
        """Validate parsed slots against the world and rebuild the spec, or None."""
        raise NotImplementedError

    def sample_followup(self, spec: dict, rng: random.Random) -> tuple[Template, dict]:
        raise NotImplementedError

    def apply_followup(self, spec: dict, slots: dict, template: Template) -> dict | None:
        raise NotImplementedError

    # --- answers ----------------------------------------------------------------------
    def key(self, spec: dict) -> str:
        """The bare answer (what 'Reply with just the answer.' asks for)."""
        raise NotImplementedError

    def sentence(self, spec: dict) -> str:
        """The answer as one complete sentence."""
        raise NotImplementedError

    def distractor(self, spec: dict, rng: random.Random) -> str:
        """A plausible wrong bare answer, for the teacher's configured errors."""
        raise NotImplementedError

    def candidates(self, spec: dict) -> set[str]:
        """Word answers that compete with the key; a response naming another one is wrong."""
        return set()

    def ideal(self, spec: dict, constraint: Constraint, rng: random.Random) -> str:
        return self.key(spec) if constraint is Constraint.JUST_ANSWER else self.sentence(spec)

    def is_correct(self, spec: dict, response: str) -> bool:
        key = self.key(spec)
        if key.startswith("["):
            return last_list(response) == key.replace(" ", "")
        if key.lstrip("-").isdigit():
            return last_number(response) == int(key)
        return has_word(response, key) and not any(has_word(response, c) for c in self.candidates(spec) - {key})

    def format_ok(self, spec: dict, constraint: Constraint, response: str) -> bool:
        if constraint is Constraint.ONE_SENTENCE:
            return len(sentences(response)) == 1
        if constraint is Constraint.JUST_ANSWER:
            return response.strip().rstrip(".") == self.key(spec)
        return True

    def courtesy_ok(self, spec: dict, response: str) -> bool:
        return True

    def on_topic(self, spec: dict, response: str) -> bool:
        """Whether the response is about the question at all (wrong answers can still be)."""
        return self.is_correct(spec, response) or bool(self.candidates(spec) & set(re.findall(r"[\w-]+", response))) \
            or last_number(response) is not None

    def flawed_format(self, spec: dict, constraint: Constraint, rng: random.Random) -> str | None:
        """An answer that ignores the format constraint, or None where there is none to ignore."""
        if constraint is Constraint.JUST_ANSWER:
            return self.sentence(spec)
        if constraint is Constraint.ONE_SENTENCE:
            return f"{self.sentence(spec)} So the answer is {self.key(spec)}."
        return None

    def wrong(self, spec: dict, constraint: Constraint, rng: random.Random) -> str:
        """A well-formed but wrong answer."""
        bad = self.distractor(spec, rng)
        return bad if constraint is Constraint.JUST_ANSWER else self.sentence(spec).replace(self.key(spec), bad)

    # --- shared -------------------------------------------------------------------------
    def render(self, spec: dict, rng: random.Random, constraint: Constraint) -> str:
        return rng.choice(self.openings).render(self.slots(spec)) + constraint.value

    def parse(self, text: str) -> tuple[dict, Constraint] | None:
        core, constraint = split_constraint(text.strip())
        for template in self.openings:
            slots = template.parse(core)
            if slots is not None and (spec := self.from_slots(slots)) is not None:
                return spec, constraint
        return None

    def parse_followup(self, spec: dict, text: str) -> tuple[dict, Constraint] | None:
        core, constraint = split_constraint(text.strip())
        for template in self.followups:
            slots = template.parse(core)
            if slots is not None and (new := self.apply_followup(spec, slots, template)) is not None:
                return new, constraint
        return None
