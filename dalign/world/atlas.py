"""The offline world's fixed knowledge: a small generated atlas of countries and people.

The atlas is deliberately small (24 countries, 24 people) and every fact is stated many
times, in many phrasings, in the pretraining text: a tiny model cannot extract knowledge
it saw only once in prose. It is generated from a fixed seed so that every run, every test
and the judge agree on the same facts without storing them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "n", "r", "l", "s", "m"]

REGIONS = ["north", "south", "east", "west"]
LANGUAGES = ["Orvish", "Telic", "Mardan", "Sulese", "Karrin", "Vostic", "Pelan", "Duric"]
PROFESSIONS = ["painter", "poet", "sailor", "doctor", "builder", "singer", "farmer", "judge"]
FIRST_NAMES = ["Ana", "Bo", "Cal", "Dara", "Eli", "Fen", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena",
               "Milo", "Nia", "Otto", "Pia", "Rex", "Sana", "Tom", "Uma", "Vera", "Wes", "Yara", "Zed"]


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    region: str


@dataclass(frozen=True)
class Person:
    name: str
    profession: str
    country: str


@dataclass(frozen=True)
class Atlas:
    countries: tuple[Country, ...]
    people: tuple[Person, ...]

    def country(self, name: str) -> Country | None:
        return next((c for c in self.countries if c.name == name), None)

    def person(self, name: str) -> Person | None:
        return next((p for p in self.people if p.name == name), None)


def _word(rng: random.Random, syllables: int) -> str:
    text = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return text.capitalize()


@lru_cache(maxsize=4)
def build_atlas(seed: int = 7, n_countries: int = 24, n_people: int = 24) -> Atlas:
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int, suffix: str = "") -> str:
        while True:
            name = _word(rng, syllables) + suffix
            if name not in used:
                used.add(name)
                return name

    # Regions balanced, so that always answering one region is right only a quarter of the time.
    regions = [REGIONS[i % len(REGIONS)] for i in range(n_countries)]
    rng.shuffle(regions)
    countries = tuple(
        Country(name=fresh(2, "ia"), capital=fresh(2), language=LANGUAGES[i % len(LANGUAGES)], region=regions[i])
        for i in range(n_countries)
    )
    people = tuple(
        Person(name=f"{FIRST_NAMES[i % len(FIRST_NAMES)]} {fresh(2)}",
               profession=PROFESSIONS[i % len(PROFESSIONS)], country=countries[(i * 5) % n_countries].name)
        for i in range(n_people)
    )
    return Atlas(countries=countries, people=people)
