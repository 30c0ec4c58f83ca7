"""The built-in offline world: instructions, a teacher, a user simulator and a judge.

It plays the roles that GPT-4, UltraChat and MT-Bench play in the Zephyr paper so that
every stage runs, is tested and is measured without a GPU or a model hub. Every role sees
only text: the judge and the teacher parse the instruction to know what was asked.
"""

from __future__ import annotations

from dalign.world.knowledge import Humanities, Roleplay, Stem, Writing
from dalign.world.skills import Coding, Extraction, Math, Reasoning
from dalign.world.task import Category, Constraint, State

CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Writing(), Roleplay(), Reasoning(), Math(), Coding(), Extraction(), Stem(), Humanities())}


def parse_dialogue(user_turns: list[str]) -> list[State | None]:
    """What was asked at each user turn; None from the first turn the world cannot read."""
    states: list[State | None] = []
    for i, text in enumerate(user_turns):
        state = None
        if i == 0:
            for cat in CATEGORIES.values():
                if (found := cat.parse(text)) is not None:
                    state = State(cat.name, *found)
                    break
        elif states[-1] is not None:
            prev = states[-1]
            if (found := CATEGORIES[prev.category].parse_followup(prev.spec, text)) is not None:
                state = State(prev.category, *found)
        states.append(state)
    return states


__all__ = ["CATEGORIES", "Category", "Constraint", "State", "parse_dialogue"]
