"""dDPO: the preference objective in the shared loop, reference log-probs, exact resume."""

import json
import random

import pytest
import torch

from dalign.chat import IGNORE, TemplateError
from dalign.config import DPOConfig, ModelShape
from dalign.data import write_rows
from dalign.dpo import PreferenceObjective, collate_pairs, completion_example, run_dpo, sequence_logps
from dalign.losses import PreferenceLoss
from dalign.pretrain import build_model
from dalign.world import CATEGORIES
from dalign.world.roles import WorldTeacher, WorldUser, seed_topics

TINY = ModelShape(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_position=128)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


def world_pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompt, the teacher's right answer as chosen, a well-formed wrong one as rejected."""
    user, teacher, rows = WorldUser(seed=seed), WorldTeacher(seed=seed), []
    for i, topic in enumerate(seed_topics(n, seed)):
        question = user.generate([[{"role": "system", "content": topic}]])[0]
        prompt = [{"role": "user", "content": question}]
        cat = CATEGORIES[topic.split()[1]]
        spec, constraint = cat.parse(question)
        rows.append({"prompt_id": f"p{i}", "prompt": prompt, "chosen": [{"role": "assistant", "content": teacher.answer(prompt)}],
                     "rejected": [{"role": "assistant", "content": cat.wrong(spec, constraint, random.Random(i))}]})
    return rows


@pytest.fixture
def setup(tmp_path, world_tokenizer):
    model = build_model(TINY, world_tokenizer, seed=0)
    model.save_pretrained(tmp_path / "sft")
    world_tokenizer.save_pretrained(tmp_path / "sft")
    write_rows(tmp_path / "pairs.jsonl", world_pairs(16))
    return tmp_path


def margins(model_path, pairs_path, tokenizer):
    """Policy-minus-reference log-ratio margins of every pair, from saved files."""
    from transformers import AutoModelForCausalLM
    from dalign.data import read_rows
    from dalign.dpo import Pair
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rows = read_rows(pairs_path)
    pairs = [Pair(completion_example(tokenizer, r["prompt"], r["chosen"]),
                  completion_example(tokenizer, r["prompt"], r["rejected"])) for r in rows]
    with torch.no_grad():
        logps = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
    return logps[:len(pairs)] - logps[len(pairs):]


def test_dpo_raises_the_chosen_over_the_rejected(setup, world_tokenizer):
    cfg = DPOConfig(max_steps=15, learning_rate=1e-2, beta=0.5, per_device_batch_size=8, checkpoint_every=100, log_every=1,
                    chosen_nll=0.0)  # plain DPO
    summary = run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "dpo")
    before = margins(setup / "sft", setup / "pairs.jsonl", world_tokenizer)
    after = margins(setup / "dpo" / "model", setup / "pairs.jsonl", world_tokenizer)
    assert (after - before).mean() > 1.0  # implicit reward margin grew
    assert (after > before).float().mean() >= 0.9
    log = [json.loads(line) for line in (setup / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["rewards/accuracy"] <= 0.5 < log[-1]["rewards/accuracy"]
    assert log[-1]["loss"] < log[0]["loss"] < 0.7  # starts near log 2 (policy == reference)
    assert summary["rows"] == {"kept": 16, "dropped": {}}


def test_first_step_loss_is_log_two_when_policy_equals_reference(setup, world_tokenizer):
    from dalign.dpo import make_pairs, reference_logps
    from collections import Counter
    from dalign.data import read_rows
    cfg = DPOConfig(per_device_batch_size=4)
    pairs = make_pairs(read_rows(setup / "pairs.jsonl"), world_tokenizer, 256, Counter())
    reference_logps(setup / "sft", pairs, setup / "pairs.jsonl", cfg, setup / "ref.json", world_tokenizer.pad_token_id)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(setup / "sft")
    loss, metrics = PreferenceObjective(0.1, PreferenceLoss.SIGMOID).loss(model, collate_pairs(pairs[:4], world_tokenizer.pad_token_id))
    assert loss.item() / 4 == pytest.approx(0.6931472, abs=1e-5)
    assert metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-5)


def test_reference_logps_are_cached_by_what_made_them(setup, world_tokenizer):
    cfg = DPOConfig(max_steps=1, checkpoint_every=100)
    run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "dpo")
    cache = setup / "dpo" / "reference_logps.json"
    first = json.loads(cache.read_text())
    assert len(first["logps"]) == 16 and all(c < 0 and r < 0 for c, r in first["logps"])
    # A different reference gives a different key and different values.
    other = build_model(TINY, world_tokenizer, seed=1)
    other.save_pretrained(setup / "other")
    world_tokenizer.save_pretrained(setup / "other")
    run_dpo(cfg, setup / "sft", setup / "other", setup / "pairs.jsonl", setup / "dpo2")
    second = json.loads((setup / "dpo2" / "reference_logps.json").read_text())
    assert second["key"] != first["key"] and second["logps"] != first["logps"]


def test_completion_labels_cover_the_completion_only(world_tokenizer):
    prompt = [{"role": "user", "content": "What is 3 plus 4?"}]
    ex = completion_example(world_tokenizer, prompt, [{"role": "assistant", "content": "3 plus 4 is 7."}])
    labelled = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    assert world_tokenizer.decode(labelled) == "3 plus 4 is 7.</s>"


def test_a_prompt_that_is_not_a_token_prefix_is_refused(world_tokenizer):
    tok = world_tokenizer
    original = tok.chat_template
    # A template that writes the generation prompt differently from a finished turn.
    tok.chat_template = original.replace("{{ '<|assistant|>\n' }}", "{{ '<|assistant|> ' }}")
    assert tok.chat_template != original
    try:
        with pytest.raises(TemplateError):
            completion_example(tok, [{"role": "user", "content": "Hi."}], [{"role": "assistant", "content": "Hello."}])
    finally:
        tok.chat_template = original


def test_dpo_resumes_exactly(setup, monkeypatch):
    cfg = DPOConfig(max_steps=4, checkpoint_every=2, learning_rate=1e-2, per_device_batch_size=4,
                    gradient_accumulation=2)
    run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "straight")

    class Killed(Exception):
        pass

    calls = {"n": 0}
    original = PreferenceObjective.loss

    def dying(self, model, batch):
        calls["n"] += 1
        if calls["n"] > 2 * 2 + 1:  # dies inside step 3, after the step-2 checkpoint
            raise Killed
        return original(self, model, batch)

    monkeypatch.setattr(PreferenceObjective, "loss", dying)
    with pytest.raises(Killed):
        run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "resumed")
    monkeypatch.setattr(PreferenceObjective, "loss", original)
    summary = run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "resumed")
    assert summary["resumed_from_step"] == 2
    from safetensors.torch import load_file
    a = load_file(setup / "straight" / "model" / "model.safetensors")
    b = load_file(setup / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (setup / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_the_chosen_nll_term_adds_the_chosen_mean_nll(setup, world_tokenizer):
    from collections import Counter
    from dalign.data import read_rows
    from dalign.dpo import make_pairs
    from transformers import AutoModelForCausalLM
    pairs = make_pairs(read_rows(setup / "pairs.jsonl"), world_tokenizer, 256, Counter())[:3]
    batch = collate_pairs(pairs, world_tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(setup / "sft")
    plain, _ = PreferenceObjective(0.1, PreferenceLoss.SIGMOID).loss(model, batch)
    with_nll, _ = PreferenceObjective(0.1, PreferenceLoss.SIGMOID, chosen_nll=0.5).loss(model, batch)
    with torch.no_grad():
        logps = sequence_logps(model, batch)[:3]
    n_tokens = torch.tensor([sum(x != IGNORE for x in p.chosen.labels[1:]) for p in pairs])
    expected = plain - 0.5 * (logps / n_tokens).sum()
    assert with_nll.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss", [PreferenceLoss.SIMPO, PreferenceLoss.ORPO])
def test_a_reference_free_loss_makes_no_reference_pass_and_still_learns(setup, world_tokenizer, monkeypatch, loss):
    import dalign.dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss asked for reference log-probs")

    monkeypatch.setattr(dalign.dpo, "reference_logps", no_reference)
    cfg = DPOConfig(max_steps=15, learning_rate=1e-2, beta=2.0 if loss is PreferenceLoss.SIMPO else 0.5, loss=loss,
                    per_device_batch_size=8, checkpoint_every=100, log_every=1)
    summary = run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "dpo")
    assert summary["reference_logps_key"] is None and not (setup / "dpo" / "reference_logps.json").exists()
    before = margins(setup / "sft", setup / "pairs.jsonl", world_tokenizer)
    after = margins(setup / "dpo" / "model", setup / "pairs.jsonl", world_tokenizer)
    assert (after - before).mean() > 1.0 and (after > before).float().mean() >= 0.9


def test_simpo_gamma_enters_the_config_only_for_simpo_and_orpo_refuses_a_second_nll():
    from pydantic import ValidationError

    assert "simpo_gamma" not in DPOConfig().model_dump()  # existing dpo stages keep their config hash
    assert DPOConfig(loss="simpo", simpo_gamma=1.0).model_dump()["simpo_gamma"] == 1.0
    with pytest.raises(ValidationError, match="chosen_nll: orpo's loss already holds"):
        DPOConfig(loss="orpo", chosen_nll=0.5)


def dialogue_examples_of(n: int, tokenizer):
    from collections import Counter

    from dalign.sft import dialogue_examples
    from test_train import world_dialogues

    return dialogue_examples(world_dialogues(n), tokenizer, 256, Counter())


def test_a_dsft_row_beside_orpo_pairs_adds_its_mean_nll_alone(setup, world_tokenizer):
    """ORPO on pairs and dSFT sequences: the pairs' ORPO losses plus each sequence's mean token NLL,
    whose gradient is that NLL's alone; packed or padded alike."""
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from dalign.data import read_rows
    from dalign.dpo import make_pairs, nll_rows
    from dalign.packed import collate_packed_pairs, packed_attention
    from dalign.train import token_loss_sum, collate

    model = AutoModelForCausalLM.from_pretrained(setup / "sft")
    pairs = make_pairs(read_rows(setup / "pairs.jsonl"), world_tokenizer, 256, Counter())[:3]
    examples = dialogue_examples_of(2, world_tokenizer)
    objective = PreferenceObjective(0.1, PreferenceLoss.ORPO)
    pad = world_tokenizer.pad_token_id
    mixed, _ = objective.loss(model, collate_pairs(pairs + nll_rows(examples), pad))
    alone, _ = objective.loss(model, collate_pairs(pairs, pad))
    nll = [token_loss_sum(model, collate([[e]], pad)) for e in examples]
    assert mixed.item() == pytest.approx(alone.item() + sum(s.item() / n for s, n in nll), rel=1e-6)
    model.zero_grad()
    objective.loss(model, collate_pairs(nll_rows(examples[:1]), pad))[0].backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (nll[0][0] / nll[0][1]).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))
    with packed_attention(model, True):
        packed, metrics = objective.loss(model, collate_packed_pairs(pairs + nll_rows(examples)))
    assert packed.item() == pytest.approx(mixed.item(), rel=1e-5) and metrics["pairs"] == 3


def test_orpo_on_the_dsft_data_and_the_pairs_learns_both(setup, world_tokenizer):
    """From a fresh model: the dSFT dialogues' NLL falls and the pairs' chosen answers gain over the rejected."""
    from dalign.train import collate, token_loss_sum
    from transformers import AutoModelForCausalLM

    examples = dialogue_examples_of(24, world_tokenizer)
    cfg = DPOConfig(loss="orpo", beta=0.5, max_steps=30, learning_rate=1e-2, per_device_batch_size=8,
                    checkpoint_every=100, log_every=5)
    summary = run_dpo(cfg, setup / "sft", setup / "sft", setup / "pairs.jsonl", setup / "orpo", sft_data=examples)
    assert summary["rows"]["kept"] == 16 and summary["sft_rows"] == 24 and summary["reference_logps_key"] is None

    def dialogue_nll(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            total, n = token_loss_sum(model, collate([[e] for e in examples], world_tokenizer.pad_token_id))
        return total.item() / n

    assert dialogue_nll(setup / "orpo" / "model") < 0.7 * dialogue_nll(setup / "sft")
    after = margins(setup / "orpo" / "model", setup / "pairs.jsonl", world_tokenizer)
    before = margins(setup / "sft", setup / "pairs.jsonl", world_tokenizer)
    assert (after - before).mean() > 1.0
