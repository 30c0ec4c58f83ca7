"""The chat template and assistant-only labels on the world tokenizer."""

from __future__ import annotations

import copy
import itertools

import pytest
from transformers import AutoTokenizer

from dalign.chat import IGNORE, SPECIAL_TOKENS, ZEPHYR_TEMPLATE, TemplateError, prompt_ids, render, tokenize_dialogue
from dalign.world.corpus import documents
from dalign.world.roles import Flaws, WorldTeacher, WorldUser, seed_topics
from dalign.world.tokenizer import train_tokenizer

GOLDEN_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "Write a note to Ana about the picnic in one sentence."},
    {"role": "assistant", "content": "Dear Ana,\nThe picnic is on Sunday by the lake.\nBest wishes."},
]
GOLDEN_TEXT = (
    "<|system|>\nYou are a helpful assistant.</s>\n"
    "<|user|>\nWhat is 3 plus 4?</s>\n"
    "<|assistant|>\n3 plus 4 is 7.</s>\n"
    "<|user|>\nWrite a note to Ana about the picnic in one sentence.</s>\n"
    "<|assistant|>\nDear Ana,\nThe picnic is on Sunday by the lake.\nBest wishes.</s>\n"
)
# Pinned from train_tokenizer(islice(documents(0), 3000), 1536): a change here means the
# tokenizer, the world's text or the template changed, and every trained model with them.
GOLDEN_IDS = [
    4, 205, 618, 369, 269, 1121, 76, 502, 269, 89, 89, 329, 305, 90, 20, 2, 205, 5, 205, 330, 285, 227, 25, 514, 227,
    26, 37, 2, 205, 6, 205, 25, 514, 227, 26, 285, 227, 29, 20, 2, 205, 5, 205, 589, 269, 374, 300, 545, 336, 276,
    527, 283, 333, 337, 20, 2, 205, 6, 205, 364, 545, 18, 205, 295, 527, 285, 317, 709, 591, 276, 707, 20, 205, 363, 367,
    20, 2, 205,
]
GOLDEN_LABELLED = list(range(31, 40)) + list(range(59, 77))  # positions of '3 plus 4 is 7.</s>' and the note + '</s>'


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled_runs(labels):
    """(start, end) of each maximal run of labelled positions."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def world_dialogues(n: int, seed: int = 0) -> list[list[dict]]:
    """Dialogues as the dialogue stage writes them: the user simulator asks, a flawed teacher
    answers, 1-3 turns; half of them with a system message."""
    user, teacher = WorldUser(seed=seed), WorldTeacher(Flaws(ramble=0.3, ignore_format=0.3, skip_courtesy=0.3, error=0.1))
    out = []
    for k, topic in enumerate(seed_topics(n, seed)):
        conv = [{"role": "system", "content": topic}]
        for _ in range(1 + k % 3):
            conv.append({"role": "user", "content": user.ask(conv)})
            conv.append({"role": "assistant", "content": teacher.answer(conv[1:])})
        system = [{"role": "system", "content": "You are a helpful assistant."}] if (k // 3) % 2 else []
        out.append(system + conv[1:])
    return out


# --- the tokenizer -----------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic(world_tokenizer):
    again = train_tokenizer(itertools.islice(documents(0), 3000), 1536)
    assert again.backend_tokenizer.to_str() == world_tokenizer.backend_tokenizer.to_str()
    assert tokenize_dialogue(again, GOLDEN_MESSAGES).input_ids == GOLDEN_IDS


def test_special_tokens_are_single_tokens(world_tokenizer):
    tok = world_tokenizer
    assert len(tok) <= 1536
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()]
    assert ids == list(range(len(SPECIAL_TOKENS)))  # trained first, in order: ids 0-6
    for token, token_id in zip(SPECIAL_TOKENS.values(), ids):
        assert tok(f"a{token}b", add_special_tokens=False)["input_ids"][1:-1] == [token_id], token
    assert tok.eos_token_id == ids[2] and tok.pad_token_id == ids[3] and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == ZEPHYR_TEMPLATE


def test_digits_are_split_one_by_one(world_tokenizer):
    ids = world_tokenizer("It prints 2024.", add_special_tokens=False)["input_ids"]
    pieces = [decode(world_tokenizer, [i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == ["2", "0", "2", "4"]
    assert decode(world_tokenizer, ids) == "It prints 2024."


# --- golden -------------------------------------------------------------------------------------


def test_golden_render_and_token_ids(world_tokenizer):
    assert render(world_tokenizer, GOLDEN_MESSAGES) == GOLDEN_TEXT
    tokenized = tokenize_dialogue(world_tokenizer, GOLDEN_MESSAGES)
    assert tokenized.input_ids == GOLDEN_IDS
    assert [i for i, x in enumerate(tokenized.labels) if x != IGNORE] == GOLDEN_LABELLED
    assert tokenized.n_labels == len(GOLDEN_LABELLED)
    assert decode(world_tokenizer, GOLDEN_IDS) == GOLDEN_TEXT


# --- template behaviour ---------------------------------------------------------------------------


def test_generation_prompt(world_tokenizer):
    prompt = render(world_tokenizer, GOLDEN_MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("</s>\n<|assistant|>\n")
    assert prompt == render(world_tokenizer, GOLDEN_MESSAGES[:2]) + "<|assistant|>\n"
    ids = prompt_ids(world_tokenizer, GOLDEN_MESSAGES[:2])
    assert ids[-2:] == [world_tokenizer.convert_tokens_to_ids("<|assistant|>"), world_tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
    assert not render(world_tokenizer, GOLDEN_MESSAGES[:2]).endswith("<|assistant|>\n")


@pytest.mark.parametrize("role", ["tool", "bot", "System"])
def test_unknown_role_raises(world_tokenizer, role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "hello"}]
    with pytest.raises(Exception, match=f"unknown role: {role}"):
        render(world_tokenizer, messages)
    with pytest.raises(Exception, match="unknown role"):
        tokenize_dialogue(world_tokenizer, messages)


def test_template_that_is_not_a_growing_prefix_is_refused(world_tokenizer):
    tok = copy.deepcopy(world_tokenizer)
    tok.chat_template = ZEPHYR_TEMPLATE.replace("for message in messages", "for message in messages|reverse")
    with pytest.raises(TemplateError):
        tokenize_dialogue(tok, GOLDEN_MESSAGES)
    assert world_tokenizer.chat_template == ZEPHYR_TEMPLATE  # the fixture is untouched


# --- assistant-only labels --------------------------------------------------------------------------


def check_labels(tok, messages):
    tokenized = tokenize_dialogue(tok, messages)
    ids, labels = tokenized.input_ids, tokenized.labels
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids))
    assert tok(render(tok, messages), add_special_tokens=False)["input_ids"] == ids
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = labelled_runs(labels)
    assert len(runs) == len(replies), messages  # every assistant turn has labels, nothing else does
    assistant_id, eos_id = tok.convert_tokens_to_ids("<|assistant|>"), tok.eos_token_id
    starts = [len(prompt_ids(tok, messages[:i])) for i, m in enumerate(messages) if m["role"] == "assistant"]
    for (start, end), reply, prompt_end in zip(runs, replies, starts):
        assert decode(tok, labels[start:end]) == reply + tok.eos_token, (reply, decode(tok, labels[start:end]))
        assert labels[end - 1] == eos_id
        assert ids[start - 2] == assistant_id  # '<|assistant|>' '\n' then the labelled reply
        assert start == prompt_end  # generation starts exactly where the labels start
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = prompt_ids(tok, messages[:i])
            assert ids[: len(prompt)] == prompt, i
    labelled_ids = {token for token in labels if token != IGNORE}
    for role in ("system", "user", "assistant"):
        assert tok.convert_tokens_to_ids(f"<|{role}|>") not in labelled_ids
    return tokenized


def test_labels_cover_exactly_the_assistant_replies(world_tokenizer):
    dialogues = world_dialogues(120)
    assert {len(d) for d in dialogues} >= {2, 4, 6, 3, 5, 7}  # 1-3 turns, with and without system
    n_labels = 0
    for messages in dialogues:
        n_labels += check_labels(world_tokenizer, messages).n_labels
    assert n_labels > 0


@pytest.mark.parametrize("reply", [
    "héllo 🙂 wörld", "  two leading spaces", "\nleading newline", "trailing space ", "ends with newline\n",
    "Dear Ana,\n\nThe picnic is on Sunday.\n\nBest wishes.", "It prints [0, 1, 2].",
])
def test_labels_for_awkward_replies(world_tokenizer, reply):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."},
                {"role": "assistant", "content": reply}, {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": reply}]
    check_labels(world_tokenizer, messages)


def test_no_labels_without_an_assistant_turn(world_tokenizer):
    tokenized = tokenize_dialogue(world_tokenizer, GOLDEN_MESSAGES[:2])
    assert tokenized.n_labels == 0 and set(tokenized.labels) == {IGNORE}
    assert tokenized.input_ids == GOLDEN_IDS[: len(tokenized.input_ids)]


# --- save and reload ----------------------------------------------------------------------------------


def test_tokenizer_saves_and_reloads(world_tokenizer, tmp_path):
    world_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == world_tokenizer.chat_template == ZEPHYR_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        world_tokenizer.bos_token_id, world_tokenizer.eos_token_id, world_tokenizer.pad_token_id)
    assert set(loaded.all_special_tokens) == set(world_tokenizer.all_special_tokens)
    assert {f"<|{r}|>" for r in ("system", "user", "assistant")} <= set(loaded.all_special_tokens)
    assert len(loaded) == len(world_tokenizer) and loaded.get_vocab() == world_tokenizer.get_vocab()
    assert render(loaded, GOLDEN_MESSAGES) == GOLDEN_TEXT
    reloaded = tokenize_dialogue(loaded, GOLDEN_MESSAGES)
    assert reloaded.input_ids == GOLDEN_IDS
    assert reloaded == tokenize_dialogue(world_tokenizer, GOLDEN_MESSAGES)
