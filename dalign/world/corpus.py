"""Plain pretraining text for the world's base model (no chat format anywhere).

It states every atlas fact in several phrasings and shows each skill as question and
answer in prose, because a tiny model cannot extract knowledge seen only once, nor learn
to copy from a prompt in a few hundred steps unless copying is practised from the start.
"""

from __future__ import annotations

import random
from typing import Iterator

from dalign.world import CATEGORIES
from dalign.world.atlas import FIRST_NAMES, build_atlas

# How often each kind of document is drawn: skills dominate, facts recur in many phrasings,
# and pure copying drills make the model learn early to copy names and numbers from its
# context (without them, whether a 2M-parameter model learns to copy in a few hundred
# steps is a matter of luck, and every category that echoes its prompt depends on it).
MIX = {"qa": 0.5, "facts": 0.2, "note": 0.1, "persona": 0.1, "copy": 0.1}


def fact_sentences(rng: random.Random) -> list[str]:
    atlas = build_atlas()
    c = rng.choice(atlas.countries)
    p = rng.choice(atlas.people)
    options = [
        f"The capital of {c.name} is {c.capital}.", f"{c.capital} is the capital of {c.name}.",
        f"{c.capital} is a city in {c.name}.", f"People in {c.name} speak {c.language}.",
        f"In {c.name}, people speak {c.language}.", f"{c.name} is in the {c.region}.",
        f"{c.name} lies in the {c.region} of the world.", f"{p.name} was a {p.profession}.",
        f"{p.name} was born in {p.country}.", f"The {p.profession} {p.name} came from {p.country}.",
    ]
    return rng.sample(options, 3)


def qa_block(rng: random.Random) -> str:
    cat = rng.choice(list(CATEGORIES.values()))
    spec, constraint = cat.sample(rng), rng.choice(cat.constraints)
    # Each question and answer starts a line, as content does in the chat template, so that
    # the tokens the base model learns are the ones SFT and evaluation will show it.
    lines = [f"Question:\n{cat.render(spec, rng, constraint)}", f"Answer:\n{cat.ideal(spec, constraint, rng)}"]
    if rng.random() < 0.4:
        template, slots = cat.sample_followup(spec, rng)
        followup = template.render(slots)
        new, _ = cat.parse_followup(spec, followup)  # through text, as every other reader does
        lines += [f"Question:\n{followup}", f"Answer:\n{cat.ideal(new, constraint, rng)}"]
    return "\n".join(lines)


def copy_drill(rng: random.Random) -> str:
    """A list of world words, then the same list again."""
    atlas = build_atlas()
    pool = FIRST_NAMES + [c.name for c in atlas.countries] + [c.capital for c in atlas.countries] + \
        [p.name for p in atlas.people] + [str(rng.randint(0, 99)) for _ in range(10)]
    items = ", ".join(rng.choice(pool) for _ in range(rng.randint(2, 6)))
    return f"List: {items}.\nSame list: {items}."


def document(rng: random.Random) -> str:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind == "copy":
        return copy_drill(rng)
    if kind == "qa":
        return "\n\n".join(qa_block(rng) for _ in range(rng.randint(1, 3)))
    if kind == "facts":
        return " ".join(fact_sentences(rng))
    if kind == "note":
        writing = CATEGORIES["writing"]
        spec = writing.sample(rng)
        return f"A note about the {spec['topic']}:\n{writing.ideal(spec, None, rng)}"
    roleplay = CATEGORIES["roleplay"]
    spec = roleplay.sample(rng)
    return f"The {spec['persona']} said to {spec['guest']}:\n{roleplay.ideal(spec, None, rng)}"


def documents(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    while True:
        yield document(rng)
