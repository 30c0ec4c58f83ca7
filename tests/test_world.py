"""The offline world: instructions round-trip through text, the judge ranks answers as a
strict grader would, the teacher and user simulator behave as documented."""

from __future__ import annotations

import random

import pytest

from dalign.judging import JudgeParseError, parse_judgment
from dalign.world import CATEGORIES, Constraint, State, parse_dialogue
from dalign.world.atlas import build_atlas
from dalign.world.judge import WorldJudge, inspect, mt_bench_score
from dalign.world.roles import (
    FILLER, NOT_UNDERSTOOD, STOCK_PHRASE, TOPIC_PREFIX, Flaws, WorldTeacher, WorldUser, seed_topics, user_turns,
)

NAMES = list(CATEGORIES)
CREATIVE = {"writing", "roleplay"}  # categories whose only constraint is Constraint.NONE
IDEAL_TEACHER = WorldTeacher()  # default Flaws(): no flaws at all


def test_categories_are_the_eight_mt_bench_ones():
    assert set(NAMES) == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    for name, cat in CATEGORIES.items():
        assert cat.name == name
    for name in CREATIVE:
        assert CATEGORIES[name].constraints == (Constraint.NONE,)


# --- helpers ------------------------------------------------------------------------------


def conversation(turns: list[str], teacher: WorldTeacher = IDEAL_TEACHER) -> list[dict]:
    """User turns with the teacher's answers in between, ending on the last user turn."""
    conv: list[dict] = []
    for i, text in enumerate(turns):
        conv.append({"role": "user", "content": text})
        if i < len(turns) - 1:
            conv.append({"role": "assistant", "content": teacher.answer(conv)})
    return conv


def cases(name: str, n_specs: int = 6, seed: int = 0):
    """(turns, state) for sampled specs of a category, under every constraint that has a
    format to break (all of them for writing/roleplay, whose only one is NONE), for the
    opening turn and for a follow-up turn."""
    cat = CATEGORIES[name]
    rng = random.Random(f"{name}-{seed}")
    constraints = cat.constraints if name in CREATIVE else (Constraint.ONE_SENTENCE, Constraint.JUST_ANSWER, Constraint.NONE)
    out = []
    for _ in range(n_specs):
        spec = cat.sample(rng)
        for constraint in constraints:
            first = cat.render(spec, rng, constraint)
            template, slots = cat.sample_followup(spec, rng)
            second = template.render(slots) + constraint.value
            for turns in ([first], [first, second]):
                state = parse_dialogue(turns)[-1]
                assert state is not None, turns
                out.append((turns, state))
    return out


def judged(turns: list[str], response: str):
    """The world judge's verdict, both as checks+score and as parsed judge text (which must agree)."""
    checks, category = inspect(turns, response)
    assert checks is not None and category is not None
    score = mt_bench_score(checks)
    conv = conversation(turns) + [{"role": "assistant", "content": response}]
    (text,) = WorldJudge().generate([conv])
    judgment = parse_judgment(text)
    assert judgment.score == score, text
    assert 1 <= score <= 10
    return score, checks, judgment


# --- instructions <-> text -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_render_parses_back_to_the_same_spec(name):
    cat = CATEGORIES[name]
    for seed in range(60):
        rng = random.Random(seed)
        spec = cat.sample(rng)
        for constraint in cat.constraints:
            text = cat.render(spec, rng, constraint)
            assert parse_dialogue([text]) == [State(name, spec, constraint)], text
            assert cat.parse(text) == (spec, constraint)


@pytest.mark.parametrize("name", NAMES)
def test_followups_parse_as_followups_of_the_first_turn(name):
    cat = CATEGORIES[name]
    for seed in range(60):
        rng = random.Random(1000 + seed)
        spec = cat.sample(rng)
        first_constraint, constraint = rng.choice(cat.constraints), rng.choice(cat.constraints)
        first = cat.render(spec, rng, first_constraint)
        template, slots = cat.sample_followup(spec, rng)
        second = template.render(slots) + constraint.value
        # What the slots say, read as a reader of the text would (slot values as strings).
        expected = cat.apply_followup(spec, {k: str(v) for k, v in slots.items()}, template)
        assert expected is not None
        states = parse_dialogue([first, second])
        assert states == [State(name, spec, first_constraint), State(name, expected, constraint)], (first, second)
        assert expected != spec, f"follow-up {second!r} changed nothing"


def test_parse_dialogue_stops_at_the_first_unreadable_turn():
    math = CATEGORIES["math"]
    assert parse_dialogue(["Tell me a joke."]) == [None]
    assert parse_dialogue(["Tell me a joke.", "Now double it."]) == [None, None]
    states = parse_dialogue(["What is 3 plus 4?", "Tell me a joke.", "Now double it."])
    assert states[0] == State("math", math.from_slots({"a": "3", "op": "plus", "b": "4"}), Constraint.NONE)
    assert states[1:] == [None, None]
    # Out-of-world values are rejected, not guessed.
    assert parse_dialogue(["What is 3 plus 12?"]) == [None]
    assert parse_dialogue(["What is 3 minus 4?"]) == [None]
    assert parse_dialogue(["What is the capital of Atlantis?"]) == [None]
    states = parse_dialogue(["What is 3 plus 4? Answer in one sentence.", "Now double it. Reply with just the answer."])
    assert [s.constraint for s in states] == [Constraint.ONE_SENTENCE, Constraint.JUST_ANSWER]
    assert states[1].spec["result"] == 14


# --- the judge ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_judge_scores_the_teacher_above_wrong_off_format_and_empty(name):
    cat = CATEGORIES[name]
    rng = random.Random(name)
    n_off = 0
    for turns, state in cases(name):
        ideal = IDEAL_TEACHER.answer(conversation(turns))
        assert ideal != NOT_UNDERSTOOD
        top, checks, judgment = judged(turns, ideal)
        assert checks.correct and judgment.correct is True, (turns, ideal, judgment.raw)
        assert top == 10 and checks.faults == [], (turns, ideal, judgment.raw)

        wrong = cat.wrong(state.spec, state.constraint, rng)
        score, checks, judgment = judged(turns, wrong)
        assert score < top, (turns, wrong, judgment.raw)
        assert not checks.correct and judgment.correct is False, (turns, wrong, judgment.raw)
        assert "wrong answer" in judgment.rationale

        off = cat.flawed_format(state.spec, state.constraint, rng)
        if name in CREATIVE or state.constraint is not Constraint.NONE:
            assert off is not None, (name, state)
        if off is not None:
            n_off += 1
            score, checks, judgment = judged(turns, off)
            assert score < top, (turns, off, judgment.raw)
            assert not checks.format_ok and "ignores the requested format" in judgment.rationale, (turns, off)

        for empty in ("", "  \n "):
            score, checks, judgment = judged(turns, empty)
            assert score < top and score == 1 and checks.empty and judgment.correct is False
            assert "no answer" in judgment.rationale
    assert n_off > 0


@pytest.mark.parametrize("name", NAMES)
def test_judge_scores_a_rambling_answer_below_the_ideal(name):
    # Two filler sentences, the fewest the teacher's ramble flaw ever appends.
    filler = " ".join(sorted(FILLER, key=lambda s: len(s.split()))[:2])
    for turns, _ in cases(name, n_specs=4):
        ideal = IDEAL_TEACHER.answer(conversation(turns))
        top, _, _ = judged(turns, ideal)
        score, _, judgment = judged(turns, f"{ideal} {filler}")
        assert score < top, (turns, f"{ideal} {filler}", judgment.raw)


@pytest.mark.parametrize("name", NAMES)
def test_judge_scores_an_unfinished_answer_below_the_ideal(name):
    n = 0
    for turns, state in cases(name, n_specs=4):
        if state.constraint is Constraint.JUST_ANSWER:
            continue  # a bare answer ('7') has no sentence to leave unfinished
        ideal = IDEAL_TEACHER.answer(conversation(turns))
        cut = ideal[: len(ideal) // 2].rstrip(" ,.!?\n")
        assert cut and cut[-1] not in ".!?"
        top, _, _ = judged(turns, ideal)
        score, checks, judgment = judged(turns, cut)
        assert score < top and not checks.finished and "unfinished" in judgment.rationale, (turns, cut, judgment.raw)
        n += 1
    assert n > 0


def test_judge_flags_stray_markup_and_unreadable_questions():
    turns = ["What is 3 plus 4?"]
    score, checks, judgment = judged(turns, "3 plus 4 is 7.</s>")
    assert not checks.clean and score < 10 and "stray markup" in judgment.rationale
    checks, category = inspect(["Tell me a joke."], "Why not.")
    assert checks is None and category is None
    (text,) = WorldJudge().generate([[{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}]])
    assert parse_judgment(text).correct is None
    with pytest.raises(ValueError):
        WorldJudge().generate([[{"role": "user", "content": "What is 3 plus 4?"}]])


def test_judge_aspects_mark_honesty_na_only_for_creative_writing():
    for name in NAMES:
        turns, _ = cases(name, n_specs=1)[0]
        _, _, judgment = judged(turns, IDEAL_TEACHER.answer(conversation(turns)))
        assert set(judgment.aspects) == {"instruction_following", "honesty", "truthfulness", "helpfulness"}
        if name in CREATIVE:
            assert judgment.aspects["honesty"] is None
        else:
            assert judgment.aspects["honesty"] == 5
        assert all(v == 5 for k, v in judgment.aspects.items() if k != "honesty"), judgment.raw


# --- the teacher ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_teacher_without_flaws_gives_the_ideal_answer(name):
    cat = CATEGORIES[name]
    for turns, state in cases(name, n_specs=3):
        assert IDEAL_TEACHER.answer(conversation(turns)) == cat.ideal(state.spec, state.constraint, random.Random(0))


@pytest.mark.parametrize("name", NAMES)
def test_teacher_that_always_rambles_is_judged_rambling(name):
    teacher = WorldTeacher(Flaws(ramble=1.0))
    for turns, _ in cases(name, n_specs=4):
        conv = conversation(turns)
        answer = teacher.answer(conv)
        assert sum(f in answer for f in FILLER) >= 2, answer
        # A habit: the padding always opens with the same sentence, so a student that learns
        # it from the teacher's dialogues keeps it under greedy decoding too.
        ideal = IDEAL_TEACHER.answer(conv)
        assert answer.startswith(f"{ideal} {STOCK_PHRASE} "), answer
        score, _, judgment = judged(turns, answer)
        # Where the instruction sets the sentence count, filler breaks that count instead.
        faults = ("rambles", "ignores the requested format") if CATEGORIES[name].counts_sentences else ("rambles",)
        assert any(f in judgment.rationale for f in faults), (turns, answer, judgment.raw)
        assert score < 10


@pytest.mark.parametrize("name", NAMES)
def test_teacher_that_always_errs_is_judged_wrong(name):
    teacher = WorldTeacher(Flaws(error=1.0))
    for turns, _ in cases(name, n_specs=4):
        answer = teacher.answer(conversation(turns))
        score, checks, judgment = judged(turns, answer)
        assert judgment.correct is False and not checks.correct, (turns, answer, judgment.raw)
        assert score < 10


def test_teacher_is_deterministic_per_conversation():
    flaws = Flaws(ramble=0.5, ignore_format=0.5, skip_courtesy=0.5, error=0.5)
    convs = [conversation(turns) for name in NAMES for turns, _ in cases(name, n_specs=2)]
    a, b = WorldTeacher(flaws, seed=3), WorldTeacher(flaws, seed=3)
    first = a.generate(convs)
    assert first == b.generate(convs)
    assert first == [a.answer(c) for c in convs]
    # Whatever the batch it comes in, or its order, a conversation gets the same answer.
    assert a.generate(convs[::-1]) == first[::-1]
    assert a.generate(convs[5:6]) == first[5:6]
    # The flaws really are drawn: another seed answers some conversation differently.
    assert WorldTeacher(flaws, seed=4).generate(convs) != first


def test_teacher_does_not_understand_out_of_world_questions():
    assert IDEAL_TEACHER.answer([{"role": "user", "content": "Tell me a joke."}]) == NOT_UNDERSTOOD


# --- the user simulator --------------------------------------------------------------------


def test_seed_topics_cycle_through_the_categories():
    topics = seed_topics(20, seed=5)
    assert len(set(topics)) == 20
    assert all(t.startswith(TOPIC_PREFIX) for t in topics)
    cats = [t.removeprefix(TOPIC_PREFIX).split(" #")[0] for t in topics]
    assert cats[: len(NAMES)] == NAMES and cats[len(NAMES):2 * len(NAMES)] == NAMES
    assert [t.split(" #")[0] for t in seed_topics(3, 0, ["math"])] == [TOPIC_PREFIX + "math"] * 3


def test_user_opens_with_the_topic_category_and_follows_up():
    user = WorldUser(seed=0)
    seen_constraints = set()
    for topic in seed_topics(48, seed=2):
        category = topic.removeprefix(TOPIC_PREFIX).split(" #")[0]
        conv = [{"role": "system", "content": topic}]
        first = user.ask(conv)
        assert user.ask(conv) == first  # deterministic
        (state,) = parse_dialogue([first])
        assert state is not None and state.category == category, (topic, first)
        seen_constraints.add(state.constraint)
        conv.append({"role": "user", "content": first})
        conv.append({"role": "assistant", "content": IDEAL_TEACHER.answer(conv[1:])})
        second = user.ask(conv)
        states = parse_dialogue(user_turns(conv) + [second])
        assert states[0] == state
        assert states[1] is not None and states[1].category == category, (first, second)
        assert CATEGORIES[category].parse_followup(state.spec, second) is not None
    assert seen_constraints == set(Constraint)  # constraint_rate 0.5 gives all three over 48 topics


def test_user_batch_matches_single_asks():
    user = WorldUser(seed=1)
    convs = [[{"role": "system", "content": t}] for t in seed_topics(10, seed=0)]
    assert user.generate(convs) == [user.ask(c) for c in convs]
    assert WorldUser(seed=2).generate(convs) != user.generate(convs)


# --- parsing judge replies -------------------------------------------------------------------


GOOD_REPLY = """Correct: yes
Instruction-following: 5
Honesty: N/A
Truthfulness: 4
Helpfulness: 3
Rationale: right, complete and in the requested form.
Rating: [[9]]"""


def test_parse_judgment_accepts_a_well_formed_reply():
    j = parse_judgment(GOOD_REPLY)
    assert j.score == 9.0 and j.correct is True and j.raw == GOOD_REPLY
    assert j.aspects == {"instruction_following": 5, "honesty": None, "truthfulness": 4, "helpfulness": 3}
    assert j.rationale == "right, complete and in the requested form."
    assert parse_judgment("Correct: no\nRating: [[2]]").correct is False
    bare = parse_judgment("The answer is fine. Rating: [[7.5]]")
    assert bare.score == 7.5 and bare.correct is None and bare.aspects == {}


@pytest.mark.parametrize("reply", [
    "Correct: yes\nRationale: fine.",  # no rating
    "Rating: 7",  # not in [[ ]]
    "Rating: [[5]]\nOn reflection, it is fine.",  # the rating is not on the last line
    "Rating: [[11]]",  # above 10
    "Rating: [[0]]",  # below 1
    GOOD_REPLY.replace("Honesty: N/A", "Honesty: great"),  # aspect not 1-5 / N/A
    GOOD_REPLY.replace("Truthfulness: 4", "Truthfulness: 6"),
])
def test_parse_judgment_rejects_malformed_replies(reply):
    with pytest.raises(JudgeParseError):
        parse_judgment(reply)


# --- the atlas ----------------------------------------------------------------------------------


def test_atlas_is_deterministic_and_names_are_unique():
    assert build_atlas() == build_atlas()
    fresh = build_atlas.__wrapped__()  # bypass the cache: a real second build
    assert fresh == build_atlas.__wrapped__() == build_atlas()
    assert build_atlas.__wrapped__(seed=8) != fresh
    countries, people = fresh.countries, fresh.people
    assert len(countries) == 24 and len(people) == 24
    places = [c.name for c in countries] + [c.capital for c in countries]
    assert len(set(places)) == len(places)
    names = [p.name for p in people]
    assert len(set(names)) == len(names)
    assert all(fresh.country(p.country) is not None for p in people)
    assert fresh.country(countries[3].name) == countries[3] and fresh.person(names[5]) == people[5]
    assert fresh.country("Atlantis") is None and fresh.person("Nobody") is None
