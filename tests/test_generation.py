"""The local generation backend: batched with left padding gives what one prompt at a time
gives, stop strings end a reply, and throughput is counted."""

from __future__ import annotations

import pytest
import torch

from dalign.backends import Sampling, cut_at_stop
from dalign.config import ModelShape
from dalign.generation import LocalModel
from dalign.pretrain import build_model

TINY = ModelShape(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_position=256)
CONVS = [[{"role": "user", "content": q}] for q in
         ["What is 2 plus 3?", "Write a note to Bo.", "Name the capital of Varnia, please, in one sentence.", "Hi"]]


@pytest.fixture
def local(world_tokenizer, one_thread):
    model = build_model(TINY, world_tokenizer, seed=0)
    # At its small default init the model only repeats a newline, which strips to "": wider
    # random weights make every reply a distinct string, so the comparisons below mean something.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    local = LocalModel(model, world_tokenizer, batch_size=4)
    assert all(local.generate(CONVS, Sampling(0.0, 12)))
    local.generated_tokens, local.seconds = 0, 0.0
    return local


def test_batched_greedy_equals_one_at_a_time(local):
    batched = local.generate(CONVS, Sampling(0.0, 12))
    single = [local.generate([c], Sampling(0.0, 12))[0] for c in CONVS]
    assert batched == single


def test_stop_strings_end_the_reply(local):
    full = local.generate(CONVS, Sampling(0.0, 24))
    # Stop at a piece each untrained reply actually contains: its third character onwards.
    for conv, text in zip(CONVS, full):
        if len(text) < 4:
            continue
        stop = text[2:4]
        [cut] = local.generate([conv], Sampling(0.0, 24, stop=(stop,)))
        assert cut == text[:text.find(stop)].strip()


def test_throughput_is_counted(local):
    local.generate(CONVS, Sampling(0.0, 8))
    t = local.throughput()
    assert 0 < t["generated_tokens"] <= 8 * len(CONVS) and t["tokens_per_second"] > 0


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc. def\\nghi", (".", "\\n")) == "abc"
    assert cut_at_stop("abc", ("x",)) == "abc" and cut_at_stop("abc", ()) == "abc"


def test_sampling_settings_can_differ_per_row(local):
    # Each row's reply under its own settings equals that row generated alone with them.
    settings = [Sampling(0.0, 4), Sampling(0.0, 12), Sampling(0.0, 4, stop=("e",)), Sampling(0.0, 12)]
    mixed = local.generate(CONVS, settings)
    alone = [local.generate([c], s)[0] for c, s in zip(CONVS, settings)]
    assert mixed == alone
    assert mixed != local.generate(CONVS, Sampling(0.0, 12))  # the short and stopped rows did change
    with pytest.raises(ValueError, match="one per conversation"):
        local.generate(CONVS, settings[:2])
