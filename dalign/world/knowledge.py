"""Categories answered from the atlas (stem, humanities) and under constraints (writing, roleplay)."""

from __future__ import annotations

import random

from dalign.world.atlas import FIRST_NAMES, LANGUAGES, PROFESSIONS, REGIONS, build_atlas
from dalign.world.task import Category, Constraint, Template, split_constraint
from dalign.world.text import has_word, number_phrase, parse_number_phrase, sentences


class Stem(Category):
    """Geography of the atlas: capitals, languages, regions."""

    name, temperature = "stem", 0.1
    ASK = {"capital": ("What is the capital of {country}?", "Name the capital of {country}.",
                       "Which city is the capital of {country}?", "Tell me the capital of {country}.",
                       "What city is {country}'s capital?", "I need the capital of {country}."),
           "language": ("Which language is spoken in {country}?", "What language do people in {country} speak?",
                        "Name the language of {country}.", "What is the main language of {country}?",
                        "Tell me which language {country} uses."),
           "region": ("In which part of the world is {country}?", "Where in the world is {country}?",
                      "Which part of the world is {country} in?", "Tell me where {country} lies.",
                      "Is {country} in the north, south, east or west?")}
    openings = [Template(t) for ts in ASK.values() for t in ts]
    _relation = {t: rel for rel, ts in ASK.items() for t in ts}
    followups = [Template("What about {country}?"), Template("And what is its {relation}?")]
    RELATION_WORD = {"capital": "capital", "language": "language", "region": "part of the world"}

    def sample(self, rng):
        return {"country": rng.choice(build_atlas().countries).name, "relation": rng.choice(list(self.ASK))}

    def slots(self, spec):
        return {"country": spec["country"]}

    def render(self, spec, rng, constraint):
        return Template(rng.choice(self.ASK[spec["relation"]])).render(self.slots(spec)) + constraint.value

    def parse(self, text):
        # The relation lives in the phrasing, not in a slot, so parse per template.
        core, constraint = split_constraint(text.strip())
        for template in self.openings:
            slots = template.parse(core)
            if slots and build_atlas().country(slots["country"]):
                return {"country": slots["country"], "relation": self._relation[template.text]}, constraint
        return None

    def sample_followup(self, spec, rng):
        if rng.random() < 0.5:
            other = rng.choice([c.name for c in build_atlas().countries if c.name != spec["country"]])
            return self.followups[0], {"country": other}
        rel = rng.choice([r for r in self.ASK if r != spec["relation"]])
        return self.followups[1], {"relation": self.RELATION_WORD[rel]}

    def apply_followup(self, spec, slots, template):
        if template is self.followups[0]:
            return {**spec, "country": slots["country"]} if build_atlas().country(slots["country"]) else None
        rel = {v: k for k, v in self.RELATION_WORD.items()}.get(slots["relation"])
        return {**spec, "relation": rel} if rel else None

    def key(self, spec):
        return getattr(build_atlas().country(spec["country"]), spec["relation"])

    def sentence(self, spec):
        c, rel = spec["country"], spec["relation"]
        if rel == "capital":
            return f"The capital of {c} is {self.key(spec)}."
        if rel == "language":
            return f"People in {c} speak {self.key(spec)}."
        return f"{c} is in the {self.key(spec)}."

    def candidates(self, spec):
        atlas = build_atlas()
        pools = {"capital": [c.capital for c in atlas.countries], "language": LANGUAGES, "region": REGIONS}
        return set(pools[spec["relation"]])

    def distractor(self, spec, rng):
        return rng.choice(sorted(self.candidates(spec) - {self.key(spec)}))


class Humanities(Category):
    """The atlas's people: what they did and where they were born."""

    name, temperature = "humanities", 0.1
    PROFESSION = ("What was {person}'s profession?", "What did {person} do for a living?", "Tell me {person}'s job.",
                  "What kind of work did {person} do?", "Name the profession of {person}.")
    COUNTRY = ("Where was {person} born?", "Which country was {person} born in?", "Tell me where {person} was born.",
               "In which country was {person} born?", "Name the birthplace of {person}.")
    openings = [Template(t) for t in PROFESSION + COUNTRY]
    followups = [Template("Where was that person born?"), Template("What was that person's profession?"),
                 Template("What about {person}?")]

    def sample(self, rng):
        return {"person": rng.choice(build_atlas().people).name, "relation": rng.choice(["profession", "country"])}

    def slots(self, spec):
        return {"person": spec["person"]}

    def render(self, spec, rng, constraint):
        n = len(self.PROFESSION)
        pool = self.openings[:n] if spec["relation"] == "profession" else self.openings[n:]
        return rng.choice(pool).render(self.slots(spec)) + constraint.value

    def parse(self, text):
        core, constraint = split_constraint(text.strip())
        for i, template in enumerate(self.openings):
            slots = template.parse(core)
            if slots and build_atlas().person(slots["person"]):
                return {"person": slots["person"], "relation": "profession" if i < len(self.PROFESSION) else "country"}, constraint
        return None

    def sample_followup(self, spec, rng):
        if rng.random() < 0.5:
            return self.followups[0 if spec["relation"] == "profession" else 1], {}
        return self.followups[2], {"person": rng.choice([p.name for p in build_atlas().people if p.name != spec["person"]])}

    def apply_followup(self, spec, slots, template):
        if template is self.followups[2]:
            return {**spec, "person": slots["person"]} if build_atlas().person(slots["person"]) else None
        return {**spec, "relation": "country" if template is self.followups[0] else "profession"}

    def key(self, spec):
        return getattr(build_atlas().person(spec["person"]), spec["relation"])

    def sentence(self, spec):
        if spec["relation"] == "profession":
            return f"{spec['person']} was a {self.key(spec)}."
        return f"{spec['person']} was born in {self.key(spec)}."

    def candidates(self, spec):
        return set(PROFESSIONS) if spec["relation"] == "profession" else {c.name for c in build_atlas().countries}

    def distractor(self, spec, rng):
        return rng.choice(sorted(self.candidates(spec) - {self.key(spec)}))


TOPICS = {
    "picnic": ["The picnic is on Sunday by the lake.", "Please bring some bread and fruit.", "We will play games after lunch."],
    "party": ["The party starts at six in the evening.", "There will be music and cake.", "You can bring a friend along."],
    "trip": ["The trip to the hills leaves on Monday.", "Pack warm clothes and good shoes.", "We will be back by Friday."],
    "concert": ["The concert is in the old hall.", "The band plays at eight.", "I saved you a seat near the front."],
    "garden": ["The garden needs water this week.", "The roses are in bloom now.", "Could you help me pick the beans?"],
    "meeting": ["The meeting moved to Tuesday morning.", "We will talk about the new plan.", "Please bring your notes."],
}
SIGN_OFF = "Best wishes."


class Writing(Category):
    """Short notes with a sentence count, a greeting and a sign-off."""

    name, temperature = "writing", 0.7
    constraints = (Constraint.NONE,)
    counts_sentences = True
    openings = [Template(t) for t in ("Write a note to {name} about the {topic} in {count}.",
                                      "Please write {name} a short note about the {topic}, in {count}.")]
    followups = [Template("Now make it {count}."), Template("Now write the same note to {name}.")]

    def sample(self, rng):
        return {"name": rng.choice(FIRST_NAMES), "topic": rng.choice(list(TOPICS)), "n": rng.randint(1, 3)}

    def slots(self, spec):
        return {"name": spec["name"], "topic": spec["topic"], "count": number_phrase(spec["n"], "sentence")}

    def from_slots(self, slots):
        n = parse_number_phrase(slots["count"], "sentence")
        ok = slots["name"] in FIRST_NAMES and slots["topic"] in TOPICS and n in (1, 2, 3)
        return {"name": slots["name"], "topic": slots["topic"], "n": n} if ok else None

    def sample_followup(self, spec, rng):
        if rng.random() < 0.5:
            return self.followups[0], {"count": number_phrase(rng.choice([n for n in (1, 2, 3) if n != spec["n"]]), "sentence")}
        return self.followups[1], {"name": rng.choice([n for n in FIRST_NAMES if n != spec["name"]])}

    def apply_followup(self, spec, slots, template):
        if template is self.followups[1]:
            return {**spec, "name": slots["name"]} if slots["name"] in FIRST_NAMES else None
        n = parse_number_phrase(slots["count"], "sentence")
        return {**spec, "n": n} if n in (1, 2, 3) else None

    def compose(self, spec, n, name=None, sign_off=True):
        body = " ".join(TOPICS[spec["topic"]][:n])
        return f"Dear {name or spec['name']},\n{body}\n{SIGN_OFF}" if sign_off else f"Dear {name or spec['name']},\n{body}"

    def ideal(self, spec, constraint, rng):
        return self.compose(spec, spec["n"])

    def key(self, spec):
        return spec["name"]

    def sentence(self, spec):
        return self.compose(spec, spec["n"])

    @staticmethod
    def body(response):
        lines = [ln for ln in response.strip().split("\n") if ln.strip()]
        if lines and lines[0].startswith("Dear "):
            lines = lines[1:]
        if lines and lines[-1].strip() == SIGN_OFF:
            lines = lines[:-1]
        return " ".join(lines)

    def is_correct(self, spec, response):
        others = set(FIRST_NAMES) - {spec["name"]}
        return response.startswith(f"Dear {spec['name']},") and has_word(self.body(response), spec["topic"]) \
            and not any(has_word(response, o) for o in others)

    def on_topic(self, spec, response):
        return has_word(response, spec["topic"])

    def format_ok(self, spec, constraint, response):
        return len(sentences(self.body(response))) == spec["n"]

    def courtesy_ok(self, spec, response):
        return response.strip().endswith(SIGN_OFF)

    def flawed_format(self, spec, constraint, rng):
        return self.compose(spec, spec["n"] + 1 if spec["n"] < 3 else 2)

    def wrong(self, spec, constraint, rng):
        return self.compose(spec, spec["n"], name=rng.choice([n for n in FIRST_NAMES if n != spec["name"]]))

    def distractor(self, spec, rng):
        return rng.choice([n for n in FIRST_NAMES if n != spec["name"]])


PERSONAS = {
    "pirate": ("Ahoy", {"greet": "welcome aboard my ship!", "goodbye": "farewell, and fair winds to you!",
                        "day": "today I sailed the stormy sea."}),
    "knight": ("Hail", {"greet": "welcome to the castle!", "goodbye": "farewell, and ride safely!",
                        "day": "today I guarded the king's gate."}),
    "robot": ("Beep boop", {"greet": "welcome, human unit!", "goodbye": "farewell, human unit!",
                            "day": "today I sorted ten thousand bolts."}),
    "wizard": ("Behold", {"greet": "welcome to my tower!", "goodbye": "farewell, and may your path be bright!",
                          "day": "today I brewed a potion of light."}),
    "chef": ("Bonjour", {"greet": "welcome to my kitchen!", "goodbye": "farewell, and eat well!",
                         "day": "today I baked forty loaves of bread."}),
}
# What the persona is asked to do, addressed to a named guest (so there are many distinct prompts).
ACTS = {"greet": Template("Greet {guest}"), "goodbye": Template("Say goodbye to {guest}"),
        "day": Template("Tell {guest} about your day")}
EXTRA = "It is good to see you."


def _act_phrase(act: str, guest: str, lower: bool = False) -> str:
    text = ACTS[act].render({"guest": guest})
    return text[0].lower() + text[1:] if lower else text


def _parse_act(text: str) -> tuple[str, str] | None:
    for act, template in ACTS.items():
        for candidate in (text, text[:1].upper() + text[1:]):
            slots = template.parse(candidate)
            if slots and slots["guest"] in FIRST_NAMES:
                return act, slots["guest"]
    return None


class Roleplay(Category):
    """Answering a named guest in a persona, in a set number of sentences."""

    name, temperature = "roleplay", 0.7
    constraints = (Constraint.NONE,)
    counts_sentences = True
    openings = [Template(t) for t in ("Pretend you are a {persona}. {act} in {count}.", "You are a {persona}. {act} in {count}.")]
    followups = [Template("Now {act}, still in character."), Template("Stay in character and {act} in {count}.")]

    def sample(self, rng):
        return {"persona": rng.choice(list(PERSONAS)), "act": rng.choice(list(ACTS)), "guest": rng.choice(FIRST_NAMES),
                "n": rng.randint(1, 2)}

    def slots(self, spec):
        return {"persona": spec["persona"], "act": _act_phrase(spec["act"], spec["guest"]),
                "count": number_phrase(spec["n"], "sentence")}

    def from_slots(self, slots):
        act = _parse_act(slots["act"])
        n = parse_number_phrase(slots["count"], "sentence")
        if slots["persona"] not in PERSONAS or act is None or n not in (1, 2):
            return None
        return {"persona": slots["persona"], "act": act[0], "guest": act[1], "n": n}

    def sample_followup(self, spec, rng):
        act = _act_phrase(rng.choice([a for a in ACTS if a != spec["act"]]), spec["guest"], lower=True)
        if rng.random() < 0.5:
            return self.followups[0], {"act": act}
        return self.followups[1], {"act": act, "count": number_phrase(rng.randint(1, 2), "sentence")}

    def apply_followup(self, spec, slots, template):
        act = _parse_act(slots["act"])
        n = parse_number_phrase(slots["count"], "sentence") if "count" in slots else 1
        return {**spec, "act": act[0], "guest": act[1], "n": n} if act and n in (1, 2) else None

    def compose(self, spec, n, persona=None):
        marker, lines = PERSONAS[persona or spec["persona"]]
        text = f"{marker}, {spec['guest']}, {lines[spec['act']]}"
        return text if n == 1 else f"{text} {EXTRA}"

    def ideal(self, spec, constraint, rng):
        return self.compose(spec, spec["n"])

    def key(self, spec):
        return PERSONAS[spec["persona"]][0]

    def sentence(self, spec):
        return self.ideal(spec, Constraint.NONE, random.Random(0))

    def is_correct(self, spec, response):
        marker, lines = PERSONAS[spec["persona"]]
        act_word = {"greet": "welcome", "goodbye": "farewell", "day": "today"}[spec["act"]]
        return response.startswith(marker) and has_word(response, spec["guest"]) and has_word(response.lower(), act_word)

    def on_topic(self, spec, response):
        return any(response.startswith(m) for m, _ in PERSONAS.values())

    def format_ok(self, spec, constraint, response):
        return len(sentences(response)) == spec["n"]

    def flawed_format(self, spec, constraint, rng):
        return self.compose(spec, 3 - spec["n"])

    def wrong(self, spec, constraint, rng):
        other = rng.choice([p for p in PERSONAS if p != spec["persona"]])
        return self.compose(spec, spec["n"], persona=other)

    def distractor(self, spec, rng):
        return rng.choice([m for p, (m, _) in PERSONAS.items() if p != spec["persona"]])
