"""Categories answered from the prompt itself: math, reasoning, coding, extraction."""

from __future__ import annotations


from dalign.world.atlas import FIRST_NAMES, build_atlas
from dalign.world.task import Category, Template

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
FRUITS = ["apple", "pear", "fig", "plum", "grape", "lemon", "melon", "peach", "cherry", "mango"]


def _int(text: str, lo: int, hi: int) -> int | None:
    return int(text) if text.isdigit() and lo <= int(text) <= hi else None


def _digits(text: str) -> list[int] | None:
    """Parse '[5, 2, 8]' into a list of single digits."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    items = [s.strip() for s in text[1:-1].split(",")]
    return [int(s) for s in items] if all(s.isdigit() and len(s) == 1 for s in items) else None


def _show(items: list[int]) -> str:
    return "[" + ", ".join(map(str, items)) + "]"


class Math(Category):
    name, temperature = "math", 0.0
    openings = [Template(t) for t in ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
                                      "Work out {a} {op} {b}.")]
    followups = [Template("Now double it."), Template("Now add {k} to it."), Template("Now take away {k}.")]

    def sample(self, rng):
        op = rng.choice(list(OPS))
        a, b = rng.randint(0, 9), rng.randint(0, 9) if op != "times" else rng.randint(1, 5)
        a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)
        return {"a": a, "op": op, "b": b, "result": OPS[op](a, b), "step": None}

    def slots(self, spec):
        return {"a": spec["a"], "op": spec["op"], "b": spec["b"]}

    def from_slots(self, slots):
        a, b, op = _int(slots["a"], 0, 9), _int(slots["b"], 0, 9), slots["op"]
        if a is None or b is None or op not in OPS or (op == "minus" and b > a):
            return None
        return {"a": a, "op": op, "b": b, "result": OPS[op](a, b), "step": None}

    def sample_followup(self, spec, rng):
        r = spec["result"]
        choices = [(self.followups[0], {}), (self.followups[1], {"k": rng.randint(1, 9)})]
        if r >= 1:
            choices.append((self.followups[2], {"k": rng.randint(1, min(r, 9))}))
        return rng.choice(choices)

    def apply_followup(self, spec, slots, template):
        r = spec["result"]
        if template is self.followups[0]:
            return {**spec, "result": 2 * r, "step": ("double", r, 0)}
        k = _int(slots["k"], 1, 9)
        if k is None:
            return None
        if template is self.followups[1]:
            return {**spec, "result": r + k, "step": ("plus", r, k)}
        return {**spec, "result": r - k, "step": ("minus", r, k)} if k <= r else None

    def key(self, spec):
        return str(spec["result"])

    def sentence(self, spec):
        if spec["step"] is None:
            return f"{spec['a']} {spec['op']} {spec['b']} is {spec['result']}."
        how, r, k = spec["step"]
        return f"Double {r} is {spec['result']}." if how == "double" else f"{r} {how} {k} is {spec['result']}."

    def distractor(self, spec, rng):
        return str(spec["result"] + rng.choice([-2, -1, 1, 2, 3]))


class Reasoning(Category):
    """Counting, then reasoning about the count in follow-ups."""

    name, temperature = "reasoning", 0.0
    openings = [Template(t) for t in ("How many items are in this list: {items}?", "Count the items in this list: {items}.",
                                      "I have {items}. How many things is that?")]
    followups = [Template("What if I add {k} more?"), Template("And if I take one away?")]

    def sample(self, rng):
        return {"items": rng.sample(FRUITS, rng.randint(2, 7)), "count": None}

    def slots(self, spec):
        return {"items": ", ".join(spec["items"])}

    def from_slots(self, slots):
        items = [s.strip() for s in slots["items"].split(",")]
        return {"items": items, "count": None} if all(i in FRUITS for i in items) and len(items) >= 2 else None

    def _count(self, spec):
        return len(spec["items"]) if spec["count"] is None else spec["count"]

    def sample_followup(self, spec, rng):
        return rng.choice([(self.followups[0], {"k": rng.randint(1, 5)}), (self.followups[1], {})])

    def apply_followup(self, spec, slots, template):
        n = self._count(spec)
        if template is self.followups[1]:
            return {**spec, "count": n - 1}
        k = _int(slots["k"], 1, 9)
        return {**spec, "count": n + k} if k is not None else None

    def key(self, spec):
        return str(self._count(spec))

    def sentence(self, spec):
        n = self._count(spec)
        if spec["count"] is None:
            return f"There are {n} items in the list."
        return f"Then there would be {n} items."

    def distractor(self, spec, rng):
        return str(self._count(spec) + rng.choice([-1, 1, 2]))


class Coding(Category):
    """What a one-line Python program prints."""

    name, temperature = "coding", 0.0
    FUNCTIONS = {"sorted": sorted, "max": max, "min": min, "len": len}
    openings = [Template(t) for t in ("What does `print({fn}({items}))` print?", "What is the output of `print({fn}({items}))`?",
                                      "Run `print({fn}({items}))` in your head. What does it print?")]
    followups = [Template("What if it used {fn} instead?"), Template("And with the list {items}?")]

    def sample(self, rng):
        return {"fn": rng.choice(list(self.FUNCTIONS)), "items": [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]}

    def slots(self, spec):
        return {"fn": spec["fn"], "items": _show(spec["items"])}

    def from_slots(self, slots):
        items = _digits(slots["items"])
        return {"fn": slots["fn"], "items": items} if items and slots["fn"] in self.FUNCTIONS else None

    def sample_followup(self, spec, rng):
        if rng.random() < 0.5:
            return self.followups[0], {"fn": rng.choice([f for f in self.FUNCTIONS if f != spec["fn"]])}
        return self.followups[1], {"items": _show([rng.randint(0, 9) for _ in range(rng.randint(3, 5))])}

    def apply_followup(self, spec, slots, template):
        if template is self.followups[0]:
            return {**spec, "fn": slots["fn"]} if slots["fn"] in self.FUNCTIONS else None
        items = _digits(slots["items"])
        return {**spec, "items": items} if items else None

    def key(self, spec):
        out = self.FUNCTIONS[spec["fn"]](spec["items"])
        return _show(out) if isinstance(out, list) else str(out)

    def sentence(self, spec):
        return f"It prints {self.key(spec)}."

    def distractor(self, spec, rng):
        if spec["fn"] == "sorted":
            return _show(sorted(spec["items"], reverse=True) if len(set(spec["items"])) > 1 else spec["items"] + [0])
        return str(int(self.key(spec)) + rng.choice([-1, 1]))


class Extraction(Category):
    """Pulling a field out of a short record given in the prompt."""

    name, temperature = "extraction", 0.0
    FIELDS = ("name", "city", "age")
    openings = [Template(t) for t in ("Here is a record: name {name}, city {city}, age {age}. What is the {field}?",
                                      "Record: name {name}; city {city}; age {age}. Give the {field}.",
                                      "From this record, what is the {field}? name {name}, city {city}, age {age}.")]
    followups = [Template("And the {field}?"), Template("What is the {field} in that record?")]

    def sample(self, rng):
        cities = [c.capital for c in build_atlas().countries]
        return {"name": rng.choice(FIRST_NAMES), "city": rng.choice(cities), "age": str(rng.randint(18, 89)),
                "field": rng.choice(self.FIELDS)}

    def slots(self, spec):
        return spec

    def from_slots(self, slots):
        cities = {c.capital for c in build_atlas().countries}
        ok = slots["name"] in FIRST_NAMES and slots["city"] in cities and _int(slots["age"], 18, 89) is not None
        return dict(slots) if ok and slots["field"] in self.FIELDS else None

    def sample_followup(self, spec, rng):
        return rng.choice(self.followups), {"field": rng.choice([f for f in self.FIELDS if f != spec["field"]])}

    def apply_followup(self, spec, slots, template):
        return {**spec, "field": slots["field"]} if slots["field"] in self.FIELDS else None

    def key(self, spec):
        return spec[spec["field"]]

    def sentence(self, spec):
        return f"The {spec['field']} is {self.key(spec)}."

    def candidates(self, spec):
        return {spec["name"], spec["city"]}

    def distractor(self, spec, rng):
        if spec["field"] == "age":
            return str(int(spec["age"]) + rng.choice([-3, 2, 5]))
        pool = FIRST_NAMES if spec["field"] == "name" else [c.capital for c in build_atlas().countries]
        return rng.choice([x for x in pool if x != self.key(spec)])
