"""The shared training loop: it learns, resumes exactly, weighs every label token the same
however a step is split into micro-batches, packs without leaking across examples, and
follows the warmup + cosine schedule. Everything runs on a tiny Llama on the CPU."""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

from dalign.chat import IGNORE, tokenize_dialogue
from dalign.config import ModelShape, SFTConfig, TrainConfig
from dalign.data import write_rows
from dalign.pretrain import build_model
from dalign.sft import dialogue_examples, run_sft
from dalign.train import Example, Plan, collate, cosine_schedule, latest_checkpoint, pack, token_loss_sum, train
from dalign.world.roles import WorldTeacher, WorldUser, seed_topics

TINY = ModelShape(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_position=128)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


def tiny_model(tokenizer, seed: int = 0):
    return build_model(TINY, tokenizer, seed)


def world_dialogues(n: int, turns: int = 2, seed: int = 0) -> list[dict]:
    """n dialogue rows written by the world's user simulator and teacher."""
    user, teacher = WorldUser(seed=seed), WorldTeacher(seed=seed)
    rows = []
    for i, topic in enumerate(seed_topics(n, seed)):
        conv = [{"role": "system", "content": topic}]
        for _ in range(turns):
            conv.append({"role": "user", "content": user.generate([conv])[0]})
            conv.append({"role": "assistant", "content": teacher.generate([conv[1:]])[0]})
        rows.append({"id": f"d{i}", "messages": conv[1:]})
    return rows


def mean_loss(model, rows, pad_id: int) -> float:
    model.eval()
    with torch.no_grad():
        total, count = token_loss_sum(model, collate(rows, pad_id))
    model.train()
    return float(total) / count


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dialogue_rows():
    return world_dialogues(16)


# --- 1. SFT learns ---------------------------------------------------------------------------


def test_sft_lowers_the_loss_and_changes_the_weights(world_tokenizer, dialogue_rows, tmp_path):
    dropped = Counter()
    examples = dialogue_examples(dialogue_rows, world_tokenizer, max_length=128, dropped=dropped)
    assert len(examples) == len(dialogue_rows) and not dropped
    rows = [[e] for e in examples]
    model = tiny_model(world_tokenizer)
    before_weights = state(model)
    before = mean_loss(model, rows, world_tokenizer.pad_token_id)
    cfg = TrainConfig(learning_rate=1e-2, max_steps=25, per_device_batch_size=8, warmup_ratio=0.1, log_every=5,
                      checkpoint_every=1000, max_length=128)
    summary = train(model, rows, partial(collate, pad_id=world_tokenizer.pad_token_id), cfg, tmp_path / "run")
    after = mean_loss(model, rows, world_tokenizer.pad_token_id)
    assert after < 0.75 * before, (before, after)
    changed = [k for k, v in state(model).items() if not torch.equal(v, before_weights[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(before_weights)
    assert summary["steps"] == 25 and summary["global_batch_size"] == 8 and summary["resumed_from_step"] == 0
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)


def test_examples_over_max_length_are_dropped_and_counted(world_tokenizer, dialogue_rows):
    lengths = [len(tokenize_dialogue(world_tokenizer, r["messages"]).input_ids) for r in dialogue_rows]
    limit = sorted(lengths)[len(lengths) // 2]
    dropped = Counter()
    examples = dialogue_examples(dialogue_rows, world_tokenizer, max_length=limit, dropped=dropped)
    assert dropped["too_long"] == sum(n > limit for n in lengths) > 0
    assert len(examples) == sum(n <= limit for n in lengths)
    assert all(len(e.input_ids) <= limit for e in examples)


def test_run_sft_with_packing_replay_and_bad_rows(world_tokenizer, dialogue_rows, tmp_path):
    base = tmp_path / "base"
    tiny_model(world_tokenizer).save_pretrained(base)
    world_tokenizer.save_pretrained(base)
    bad = {"id": "bad", "messages": [{"role": "user", "content": "hello"}, {"role": "robot", "content": "beep"}]}
    path = tmp_path / "dialogues.jsonl"
    write_rows(path, dialogue_rows[:8] + [bad])
    replay = torch.randint(10, len(world_tokenizer), (2000,)).numpy()
    cfg = SFTConfig(max_steps=2, per_device_batch_size=2, max_length=128, packing=True, replay_ratio=0.25,
                    skip_bad_rows=True, checkpoint_every=1000, log_every=1)
    summary = run_sft(cfg, base, path, tmp_path / "sft", replay)
    assert summary["rows"]["kept"] == 8
    assert summary["rows"]["dropped"] == {"unknown_role": 1}
    assert summary["rows"]["replay"] == round(8 * 0.25 / 0.75)
    assert len(summary["read_errors"]) == 1 and "row 9" in summary["read_errors"][0]
    assert summary["steps"] == 2 and summary["global_batch_size"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert reloaded.config.vocab_size == len(world_tokenizer)
    with pytest.raises(Exception, match="unknown role"):  # without skip_bad_rows the bad row stops the stage
        run_sft(cfg.model_copy(update={"skip_bad_rows": False}), base, path, tmp_path / "sft2", replay)


# --- 2. exact resume -------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def dies_after(make, batches: int):
    """`make` for a run killed mid-way: it raises Interrupt when asked for batch `batches` + 1."""
    made = {"n": 0}

    def dying(batch_rows):
        made["n"] += 1
        if made["n"] > batches:
            raise Interrupt
        return make(batch_rows)

    return dying


def test_resume_after_interruption_gives_exactly_the_same_weights(world_tokenizer, dialogue_rows, tmp_path):
    examples = dialogue_examples(dialogue_rows[:12], world_tokenizer, 128, Counter())
    rows = [[e] for e in examples]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    # 12 rows / global batch 4 = 3 steps per epoch: 6 steps cross an epoch boundary.
    cfg = TrainConfig(learning_rate=5e-3, max_steps=6, per_device_batch_size=2, gradient_accumulation=2,
                      checkpoint_every=3, log_every=1, warmup_ratio=0.2, max_length=128)

    straight = tiny_model(world_tokenizer)
    train(straight, rows, make, cfg, tmp_path / "A")

    with pytest.raises(Interrupt):  # two micro-batches a step: dies in step 5, after step 4 was logged
        train(tiny_model(world_tokenizer), rows, dies_after(make, 8), cfg, tmp_path / "B")
    assert latest_checkpoint(tmp_path / "B" / "checkpoints").name == "step-3"
    assert [m["step"] for m in read_metrics(tmp_path / "B" / "metrics.jsonl")] == [1, 2, 3, 4]

    resumed = tiny_model(world_tokenizer)  # fresh weights: everything must come from the checkpoint
    summary = train(resumed, rows, make, cfg, tmp_path / "B")
    assert summary["resumed_from_step"] == 3

    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = read_metrics(tmp_path / "A" / "metrics.jsonl"), read_metrics(tmp_path / "B" / "metrics.jsonl")
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    for x, y in zip(ma, mb):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"] and x["grad_norm"] == y["grad_norm"], x["step"]
    # The logged learning rate is the schedule's value for the next step.
    warmup = int(cfg.warmup_ratio * 6)
    for m in ma:
        assert m["lr"] == pytest.approx(cfg.learning_rate * cosine_schedule(m["step"], 6, warmup))


def test_a_run_killed_before_its_first_checkpoint_logs_no_step_twice(world_tokenizer, dialogue_rows, tmp_path):
    examples = dialogue_examples(dialogue_rows[:8], world_tokenizer, 128, Counter())
    rows = [[e] for e in examples]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=4, per_device_batch_size=2, checkpoint_every=100, log_every=1)
    calls = {"n": 0}

    def dying(batch_rows):
        calls["n"] += 1
        if calls["n"] > 2:  # dies in step 3: steps 1 and 2 are logged, nothing is checkpointed
            raise Interrupt
        return make(batch_rows)

    with pytest.raises(Interrupt):
        train(tiny_model(world_tokenizer), rows, dying, cfg, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    summary = train(tiny_model(world_tokenizer), rows, make, cfg, tmp_path / "run")
    assert summary["resumed_from_step"] == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_finished_run_is_not_trained_again(world_tokenizer, dialogue_rows, tmp_path):
    examples = dialogue_examples(dialogue_rows[:4], world_tokenizer, 128, Counter())
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    cfg = TrainConfig(max_steps=2, per_device_batch_size=2, checkpoint_every=1, log_every=1)
    first = tiny_model(world_tokenizer)
    train(first, [[e] for e in examples], make, cfg, tmp_path / "run")
    again = tiny_model(world_tokenizer)
    summary = train(again, [[e] for e in examples], make, cfg, tmp_path / "run")
    assert summary["resumed_from_step"] == 2
    assert all(torch.equal(v, state(first)[k]) for k, v in state(again).items())
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# --- 3. loss normalisation across micro-batches ------------------------------------------------


def _uneven_examples(tokenizer) -> list[Example]:
    """Four sequences whose label counts differ by more than 10x."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, labelled in [(40, 38), (12, 2), (30, 3), (24, 24)]:
        ids = torch.randint(10, len(tokenizer), (length,), generator=g).tolist()
        labels = [IGNORE] * (length - labelled) + ids[length - labelled:]
        out.append(Example(ids, labels))
    return out


def _step_grads(model, rows, make, cfg, out) -> dict[str, torch.Tensor]:
    """Gradients of the single optimizer step of `cfg` (captured once fully accumulated)."""
    grads = {}
    names = {p: n for n, p in model.named_parameters()}
    handles = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(names[p], p.grad.detach().clone()))
               for p in model.parameters()]
    try:
        train(model, rows, make, cfg, out)
    finally:
        for h in handles:
            h.remove()
    return grads


def test_loss_is_normalised_by_label_tokens_across_micro_batches(world_tokenizer, tmp_path):
    examples = _uneven_examples(world_tokenizer)
    rows = [[e] for e in examples]
    make = partial(collate, pad_id=world_tokenizer.pad_token_id)
    common = dict(max_steps=1, learning_rate=1e-2, warmup_ratio=0.0, max_grad_norm=1e6, checkpoint_every=1000)
    split = TrainConfig(per_device_batch_size=2, gradient_accumulation=2, **common)
    whole = TrainConfig(per_device_batch_size=4, gradient_accumulation=1, **common)
    plan = Plan(rows, split, 1, 0)
    assert sorted(len(r[0].input_ids) for mb in plan.micro_batches(0) for r in mb) == [12, 24, 30, 40]
    assert [len(mb) for mb in plan.micro_batches(0)] == [2, 2]

    # The reference: summed token loss of all four rows, divided by their label tokens.
    ref_model = tiny_model(world_tokenizer)
    total, count = zip(*(token_loss_sum(ref_model, make([r])) for r in rows))
    assert sum(count) == 38 + 2 + 3 + 24 - 1  # the first token is never a target
    (sum(total) / sum(count)).backward()
    reference = {n: p.grad.clone() for n, p in ref_model.named_parameters()}

    g_split = _step_grads(tiny_model(world_tokenizer), rows, make, split, tmp_path / "split")
    g_whole = _step_grads(tiny_model(world_tokenizer), rows, make, whole, tmp_path / "whole")
    assert g_split.keys() == reference.keys() == g_whole.keys()
    for name in reference:
        assert torch.allclose(g_split[name], reference[name], atol=1e-5, rtol=1e-4), name
        assert torch.allclose(g_whole[name], reference[name], atol=1e-5, rtol=1e-4), name
    # Both log the mean loss per label token of the whole step.
    expected = float(sum(total).detach() / sum(count))
    for run in ("split", "whole"):
        assert read_metrics(tmp_path / run / "metrics.jsonl")[0]["loss"] == pytest.approx(expected, rel=1e-5)

    # The check can fail: averaging each micro-batch's own mean gives other gradients.
    wrong_model = tiny_model(world_tokenizer)
    for mb in plan.micro_batches(0):
        loss, n = token_loss_sum(wrong_model, make(mb))
        (loss / n / len(plan.micro_batches(0))).backward()
    emb = "model.embed_tokens.weight"
    assert not torch.allclose(dict(wrong_model.named_parameters())[emb].grad, reference[emb], atol=1e-5, rtol=1e-4)


def test_plan_is_a_pure_function_of_seed_and_step():
    rows = list(range(10))
    cfg = TrainConfig(per_device_batch_size=2, gradient_accumulation=2, seed=3, max_steps=7)
    plan = Plan(rows, cfg, 1, 0)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 7
    first = [plan.rows_for(s) for s in range(7)]
    assert first == [Plan(rows, cfg, 1, 0).rows_for(s) for s in range(7)]
    assert len(set(first[0]) | set(first[1])) == 8  # no row twice within an epoch
    assert first[0] != first[2]  # each epoch has its own order
    other = Plan(rows, cfg.model_copy(update={"seed": 4}), 1, 0)
    assert [other.rows_for(s) for s in range(2)] != first[:2]
    # Two processes split each global batch between them, without overlap.
    r0, r1 = Plan(rows, cfg, 2, 0), Plan(rows, cfg, 2, 1)
    assert r0.global_batch == 8 and sorted(r0.rows_for(0) + r1.rows_for(0)) == sorted(
        Plan(rows, cfg.model_copy(update={"per_device_batch_size": 4}), 1, 0).rows_for(0))
    epochs = Plan(rows, TrainConfig(per_device_batch_size=2, epochs=2.5), 1, 0)
    assert epochs.total_steps == 12


# --- 4. packing ------------------------------------------------------------------------------


def test_pack_is_greedy_in_order_and_respects_max_length():
    exs = [Example([1] * n, [1] * n) for n in (5, 4, 3, 7, 2, 9)]
    bins = pack(exs, 10)
    assert [[len(e.input_ids) for e in b] for b in bins] == [[5, 4], [3, 7], [2], [9]]
    assert [e for b in bins for e in b] == exs
    assert pack([Example([1] * 12, [1] * 12)], 10) == [[Example([1] * 12, [1] * 12)]]  # too long: alone


def test_packed_rows_attend_only_within_each_example(world_tokenizer, dialogue_rows):
    examples = dialogue_examples(dialogue_rows[:6], world_tokenizer, 128, Counter())
    bins = pack(examples, 128)
    assert any(len(b) >= 2 for b in bins)
    batch = collate(bins, world_tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # a packed batch relies on position ids only
    model = tiny_model(world_tokenizer).eval()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(bins):
            at = 0
            for ex in row:
                n = len(ex.input_ids)
                alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                assert torch.allclose(packed_logits[r, at:at + n], alone, atol=1e-4), (r, at)
                assert batch["position_ids"][r, at:at + n].tolist() == list(range(n))
                at += n
            width = batch["input_ids"].shape[1]
            assert batch["labels"][r].tolist() == [x for ex in row for x in ex.labels] + [IGNORE] * (width - at)
            assert batch["input_ids"][r, at:].eq(world_tokenizer.pad_token_id).all()


def test_packed_loss_equals_the_losses_of_the_examples_alone(world_tokenizer, dialogue_rows):
    """A packed row's loss must be the sum of its examples' losses: no target may cross a border.
    Replay text (every token labelled) packed after a dialogue must not be predicted from the
    dialogue's last token."""
    dialogues = dialogue_examples(dialogue_rows[:2], world_tokenizer, 128, Counter())
    g = torch.Generator().manual_seed(1)
    replay = [Example(ids, list(ids)) for ids in (torch.randint(10, 500, (20,), generator=g).tolist() for _ in range(2))]
    row = [dialogues[0], replay[0], dialogues[1], replay[1]]
    model = tiny_model(world_tokenizer).eval()
    with torch.no_grad():
        packed_loss, packed_count = token_loss_sum(model, collate([row], world_tokenizer.pad_token_id))
        alone = [token_loss_sum(model, collate([[ex]], world_tokenizer.pad_token_id)) for ex in row]
    assert packed_count == sum(n for _, n in alone)
    assert torch.allclose(packed_loss, sum(loss for loss, _ in alone), rtol=1e-4)


# --- 5. schedule -----------------------------------------------------------------------------


def test_cosine_schedule_values():
    assert cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert cosine_schedule(4, 100, 10) == pytest.approx(0.5)
    assert cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(10, 100, 10) == pytest.approx(1.0)  # the peak, then the decay starts
    assert cosine_schedule(55, 100, 10) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_schedule(99, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert cosine_schedule(99, 100, 10) < 1e-3
    assert cosine_schedule(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_schedule(150, 100, 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    assert cosine_schedule(0, 10, 0) == 1.0  # no warmup: start at the peak
    values = [cosine_schedule(s, 100, 10) for s in range(100)]
    assert values[:10] == sorted(values[:10]) and values[10:] == sorted(values[10:], reverse=True)
