"""Parsing judge replies: strict, with the raw text kept beside the parsed value."""

from __future__ import annotations

import re
from dataclasses import dataclass

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
_RATING = re.compile(r"Rating:\s*\[\[(\d+(?:\.\d+)?)\]\]")


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
    if text is None:
        raise JudgeParseError("the judge gave no reply (its backend failed after retries)")
    ratings = _RATING.findall(text)
    if len(ratings) != 1:
        raise JudgeParseError(f"expected exactly one 'Rating: [[N]]', found {len(ratings)}")
    score = float(ratings[0])
    if not 1 <= score <= 10:
        raise JudgeParseError(f"rating {score} is outside 1-10")
    fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", text, flags=re.MULTILINE))
    aspects = {}
    for name in ASPECTS:
        value = fields.get(name.replace("_", "-").capitalize())
        if value is not None:
            if value.strip() not in ("N/A", "1", "2", "3", "4", "5"):
                raise JudgeParseError(f"aspect {name} has value {value!r}, expected 1-5 or N/A")
            aspects[name] = None if value.strip() == "N/A" else int(value)
    correct = {"yes": True, "no": False}.get(fields.get("Correct", "").strip().lower())
    return Judgment(score=score, correct=correct, aspects=aspects, rationale=fields.get("Rationale", ""), raw=text)
