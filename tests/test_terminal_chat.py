"""`dalign chat` driven through a pseudo-terminal: what it streams is what the same model generates
greedily in-process for the whole conversation, /reset and /system restart it, a generation config's
end-of-turn token ends a reply, a tokenizer without a template gets dalign's, and a model that cannot
be loaded is named with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest
import torch
from test_generation import local  # noqa: F401  (the tiny model whose greedy replies differ per prompt)

from dalign.chat import ZEPHYR_TEMPLATE

MAX_NEW = 12
PROMPT = "you> "
CUT = f"(cut at --max-new-tokens {MAX_NEW})"
CLI = [sys.executable, "-m", "dalign.cli", "chat"]
# A dumb terminal keeps readline's escape sequences out of the output; one thread each, as the cores are shared.
ENV = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
Q1, Q2 = "What is 2 plus 3?", "Write a note to Bo."


@pytest.fixture
def folder(local, tmp_path):  # noqa: F811
    local.model.save_pretrained(tmp_path / "m")
    local.tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def start():
    """Starts `dalign chat FOLDER` greedy at MAX_NEW tokens and waits for its first prompt; a hang
    fails at pexpect's timeout, and every session is killed at the end of the test."""
    children = []

    def spawn(folder, *options: str) -> pexpect.spawn:
        child = pexpect.spawn(CLI[0], CLI[1:] + [str(folder), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                                                 *options], env=ENV, encoding="utf-8", timeout=60, dimensions=(50, 300))
        children.append(child)
        child.expect_exact(PROMPT)
        return child
    yield spawn
    for child in children:
        child.close(force=True)


def say(child: pexpect.spawn, line: str) -> str:
    """What the chat printed between the echo of `line` and its next prompt, line ends as '\\n'."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line + "\n"), out
    return out[len(line) + 1:]


def streamed(out: str) -> str:
    """The reply text of one turn's output: the stream, then a newline, a note if cut, a blank line."""
    assert out.endswith("\n\n"), out
    return out[:-2].removesuffix("\n" + CUT)


def greedy(model, tokenizer, messages: list[dict]) -> str:
    """The expected reply, computed in-process from the model's own template and `generate`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def turn(content: str, reply: str) -> list[dict]:
    # The chat keeps a reply stripped in the conversation, as dalign's generator returns it.
    return [{"role": "user", "content": content}, {"role": "assistant", "content": reply.strip()}]


def test_replies_are_the_greedy_generation_of_the_whole_conversation(local, folder, start):  # noqa: F811
    model, tok = local.model, local.tokenizer
    first = greedy(model, tok, [{"role": "user", "content": Q1}])
    second = greedy(model, tok, turn(Q1, first) + [{"role": "user", "content": Q2}])
    alone = greedy(model, tok, [{"role": "user", "content": Q2}])
    assert first.strip() and second != alone  # the second turn depends on the first, so a lost turn shows

    chat = start(folder)
    out = say(chat, Q1)
    assert streamed(out) == first and CUT in out  # untrained: it runs to the token limit, and says so
    assert streamed(say(chat, Q2)) == second
    assert say(chat, "/reset") == "(conversation cleared)\n"
    assert streamed(say(chat, Q1)) == first
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_system_sets_the_prompt_and_reset_keeps_it(local, folder, start):  # noqa: F811
    model, tok = local.model, local.tokenizer
    system = [{"role": "system", "content": "Answer in one word."}]
    plain = greedy(model, tok, [{"role": "user", "content": Q1}])
    with_system = greedy(model, tok, system + [{"role": "user", "content": Q1}])
    assert plain != with_system

    chat = start(folder)
    assert streamed(say(chat, Q1)) == plain
    assert say(chat, "/system Answer in one word.") == "(system prompt set; conversation cleared)\n"
    assert streamed(say(chat, Q1)) == with_system  # from the system prompt alone: the first turn is gone
    assert say(chat, "/reset") == "(conversation cleared; the system prompt is kept)\n"
    assert streamed(say(chat, Q1)) == with_system
    assert say(chat, "/system") == "(system prompt removed; conversation cleared)\n"
    assert streamed(say(chat, Q1)) == plain


def test_an_end_of_turn_token_ends_the_reply_and_eof_leaves(local, folder, start):  # noqa: F811
    # Llama 3 style: the generation config names an end-of-turn token besides the eos. Here it is
    # the greedy reply's fourth token, so the reply must stop there.
    model, tok = local.model, local.tokenizer
    ids = tok(tok.apply_chat_template([{"role": "user", "content": Q1}], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt").input_ids
    end_of_turn = model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id)[0, -1].item()
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    model.save_pretrained(folder)
    expected = greedy(model, tok, [{"role": "user", "content": Q1}])
    assert len(tok(expected, add_special_tokens=False).input_ids) < MAX_NEW

    chat = start(folder)
    out = say(chat, Q1)
    assert streamed(out) == expected and CUT not in out
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_a_tokenizer_without_a_template_gets_dalign_s_and_says_so_once(local, folder, start):  # noqa: F811
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = (folder / "tokenizer_config.json").read_text()
    (folder / "tokenizer_config.json").write_text(config.replace('"chat_template"', '"_unused"'))
    tok = local.tokenizer
    tok.chat_template = ZEPHYR_TEMPLATE
    first = greedy(local.model, tok, [{"role": "user", "content": Q1}])

    chat = start(folder)
    banner = chat.before
    assert banner.count("no chat template") == 1 and "default (Zephyr) template" in banner
    out = say(chat, Q1)
    assert streamed(out) == first and "no chat template" not in out


def test_a_model_that_cannot_be_loaded_is_named_with_status_2(world_tokenizer, tmp_path):
    world_tokenizer.save_pretrained(tmp_path / "no-weights")  # a tokenizer, but no config or weights
    (tmp_path / "empty").mkdir()  # transformers refuses it with a ValueError, not an OSError
    models = (tmp_path / "nowhere", tmp_path / "no-weights", tmp_path / "empty")
    # Side by side: most of each run is importing dalign, and one after another they took 20 s.
    runs = [subprocess.Popen(CLI + [str(m)], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for m in models]
    for model, run in zip(models, runs):
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, stderr
        assert "dalign: error: " in stderr and str(model) in stderr
        assert "Traceback" not in stderr and PROMPT not in stdout
