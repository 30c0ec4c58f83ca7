"""Parsing judge replies: strict, with the raw text kept beside the parsed value."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import takewhile

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
_RATING = re.compile(r"Rating:\s*\[\[(\d+(?:\.\d+)?)\]\][\W_]*$")  # closing the line; '**' or '.' may follow
_FIELD = re.compile(r"^([A-Za-z-]+):[ \t]*(.*)$")


class JudgeParseError(ValueError):
    """A judge reply that does not contain the required rating."""


@dataclass
class Judgment:
    score: float  # MT-Bench style, 1-10
    correct: bool | None  # only judges that state it (the world judge does)
    aspects: dict[str, int | None]  # UltraFeedback aspects, 1-5 or None for N/A; empty if not given
    rationale: str
    raw: str


def parse_judgment(text: str | None) -> Judgment:
    """The rating is read from the reply's last line, the fields (Correct, the aspects, Rationale)
    from the 'Name: value' lines directly above it; anything earlier is the judge's explanation.

    Why the last line: the template asks for the rating there, after the explanation, and a
    judge explaining itself may quote the answer, fake verdict ('Rating: [[10]]') and all.
    FastChat's llm_judge takes the first [[N]] anywhere, which scores that quote. Refusing a
    reply with two ratings would make each such quote a failure, and a failure drops out of
    the mean, so a bad answer could escape its low score by carrying a fake verdict. A reply
    that only echoes the prompt fails: every template ends on a line that is not a verdict."""
    if text is None:
        raise JudgeParseError("the judge gave no reply (its backend failed after retries)")
    lines = text.strip().splitlines()
    found = _RATING.search(lines[-1]) if lines else None
    if found is None:
        raise JudgeParseError("expected 'Rating: [[N]]' to end the reply's last line")
    score = float(found.group(1))
    if not 1 <= score <= 10:
        raise JudgeParseError(f"rating {score} is outside 1-10")
    block = list(takewhile(bool, (_FIELD.match(line) for line in reversed(lines[:-1]))))
    fields = dict(m.groups() for m in reversed(block))
    aspects = {}
    for name in ASPECTS:
        value = fields.get(name.replace("_", "-").capitalize())
        if value is not None:
            if value.strip() not in ("N/A", "1", "2", "3", "4", "5"):
                raise JudgeParseError(f"aspect {name} has value {value!r}, expected 1-5 or N/A")
            aspects[name] = None if value.strip() == "N/A" else int(value)
    correct = {"yes": True, "no": False}.get(fields.get("Correct", "").strip().lower())
    return Judgment(score=score, correct=correct, aspects=aspects, rationale=fields.get("Rationale", ""), raw=text)
