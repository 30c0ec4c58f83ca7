"""Shared fixtures: the world tokenizer, trained once per test session."""

from __future__ import annotations

import contextlib
import io
import itertools

import pytest
import torch

from dalign.world.corpus import documents
from dalign.world.tokenizer import train_tokenizer

TOKENIZER_DOCS = 3000
TOKENIZER_VOCAB = 1536


def make_world_tokenizer():
    """The tokenizer every chat test uses; training is deterministic for the same documents."""
    return train_tokenizer(itertools.islice(documents(0), TOKENIZER_DOCS), TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def world_tokenizer():
    return make_world_tokenizer()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The whole micro recipe (tests/micro.py), run once through the CLI on one thread: (recipe
    path, run dir, exit code, stdout, stderr)."""
    from micro import write_recipe

    from dalign.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("stages")
    run_dir = folder / "run"
    path = write_recipe(folder, run_dir)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", str(path)])
    torch.set_num_threads(before)
    return path, run_dir, code, out.getvalue(), err.getvalue()
