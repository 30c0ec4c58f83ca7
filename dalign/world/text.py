"""Small text helpers shared by the world's tasks, teacher and judge."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"-?\d+")
_LIST = re.compile(r"\[[^\[\]]*\]")


def sentences(text: str) -> list[str]:
    """Split on sentence-final punctuation; a trailing fragment counts as a sentence."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def words(text: str) -> list[str]:
    return text.split()


def last_number(text: str) -> int | None:
    found = _NUMBER.findall(_LIST.sub(" ", text))
    return int(found[-1]) if found else None


def last_list(text: str) -> str | None:
    found = _LIST.findall(text)
    return found[-1].replace(" ", "") if found else None


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def number_phrase(n: int, noun: str) -> str:
    """'one sentence', 'two sentences': the world writes small counts in words."""
    name = ["zero", "one", "two", "three", "four", "five"][n]
    return f"{name} {noun}" if n == 1 else f"{name} {noun}s"


def parse_number_phrase(text: str, noun: str) -> int | None:
    names = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    m = re.fullmatch(rf"(\w+) {noun}s?", text)
    return names.get(m.group(1)) if m else None
