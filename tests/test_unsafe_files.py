"""No file dalign reads can run code: checkpoints are unpickled weights-only, models load from
safetensors only, and a model's own Python code is never run. Each test plants a pickle (or a
module) that would create a marker file when loaded and shows it is refused, marker absent."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from functools import partial

import pytest
import torch

from dalign.config import TrainConfig
from dalign.models import ModelError, load_model
from dalign.sft import dialogue_examples
from dalign.train import collate, latest_checkpoint, train
from test_train import tiny_model, world_dialogues


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint or model file holds."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread."""


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_code_running_pickle_in_a_checkpoint_is_refused(world_tokenizer, tmp_path, planted):
    rows = [[e] for e in dialogue_examples(world_dialogues(4), world_tokenizer, 128, Counter())]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=2, per_device_batch_size=2, checkpoint_every=1, log_every=1)
    train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (ckpt / planted).exists()  # a file the checkpoint really has (custom_checkpoint_0: the schedule)
    marker = tmp_path / "ran"
    torch.save(RunsCode(marker), ckpt / planted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "run")  # resumes: loads the checkpoint
    assert not marker.exists()


def test_a_model_folder_with_only_a_pickled_checkpoint_is_refused(world_tokenizer, tmp_path):
    folder = tmp_path / "model"
    tiny_model(world_tokenizer).config.save_pretrained(folder)
    marker = tmp_path / "ran"
    torch.save(RunsCode(marker), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(folder)
    assert not marker.exists()


def test_a_model_folder_that_brings_its_own_code_never_runs_it(world_tokenizer, tmp_path):
    folder = tmp_path / "model"
    model = tiny_model(world_tokenizer)
    model.save_pretrained(folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    # transformers then builds its own class for the config's model type; the folder's code never runs.
    loaded = load_model(folder)
    assert type(loaded) is type(model) and not marker.exists()
