"""dalign's DPO loss and rewards equal TRL's DPOTrainer on the same tiny model and batch.

TRL is the peer and a test-only dependency: it is imported here, never in dalign/. Both sides
score the same token sequences. TRL tokenizes the conversational rows itself (the chat template
on the prompt with the generation prompt, then on prompt + completion) and produces exactly the
ids dalign.dpo.completion_example produces. Its completion mask covers one token more than
dalign's labels: the template's '\\n' after the closing '</s>'. dalign labels the reply and its
eos only (dalign.chat), as its SFT does. So the comparison scores TRL's own batch, with its
completion mask as the labels, and a separate check pins down that one-token difference.
"""

import copy
import math

import pytest
import torch

from dalign.chat import IGNORE
from dalign.dpo import Pair, PreferenceObjective, collate_pairs, completion_example, sequence_logps
from dalign.losses import PreferenceLoss
from dalign.pretrain import build_model
from dalign.train import Example

from test_dpo import TINY, world_pairs
from trl_peer import train_capturing_batches

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# TRL 1.16 calls a transformers 5.23 method that is deprecated; nothing this test controls.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

BETA = 0.1
N = 6  # pairs, all in one batch
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


@pytest.fixture(scope="module")
def peer(world_tokenizer, tmp_path_factory):
    return trl_step(world_tokenizer, tmp_path_factory, "sigmoid")


@pytest.fixture(scope="module")
def peer_norm(world_tokenizer, tmp_path_factory):
    # Mean log-ratios are a sequence's summed ones over ~100 tokens: a beta 50 times DPO's keeps
    # the loss away from log 2, where any two losses agree.
    return trl_step(world_tokenizer, tmp_path_factory, "sigmoid_norm", NORM_BETA)


NORM_BETA = 50 * BETA


def trl_step(world_tokenizer, tmp_path_factory, loss_type: str, beta: float = BETA) -> dict:
    """One TRL DPO step (learning rate 0) on N world pairs: its batch, its logged metrics, and
    untouched copies of the policy and reference weights it scored them with."""
    rows = world_pairs(N)
    policy = build_model(TINY, world_tokenizer, seed=0)
    reference = far_copy(policy)
    ours = copy.deepcopy(policy).eval(), copy.deepcopy(reference).eval()  # TRL patches its models' forward
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, use_cpu=True, beta=beta,
                         loss_type=[loss_type], per_device_train_batch_size=N, max_steps=1, learning_rate=0.0,
                         logging_steps=1, report_to=[], save_strategy="no", activation_checkpointing=False,
                         precompute_ref_log_probs=False, max_length=None, dataloader_num_workers=0)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=world_tokenizer)
    assert not trainer.args.gradient_checkpointing and not trainer.precompute_ref_logps
    batches = train_capturing_batches(trainer)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2 * N  # chosen rows, then rejected rows
    logged = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)
    return {"rows": rows, "tokenized": list(trainer.train_dataset), "batch": batches[0], "logged": logged,
            "policy": ours[0], "reference": ours[1]}


def far_copy(model):
    """The model with its weights perturbed and its final norm scaled up: a reference whose
    log-probs are far from the policy's, so rewards are of order 1 (not 0, the loss not log 2)."""
    other, noise = copy.deepcopy(model), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
        other.model.norm.weight.mul_(5.0)
    return other


def pairs_from_trl_batch(batch: dict) -> list[Pair]:
    """dalign pairs holding exactly TRL's sequences, labelled where TRL's completion mask is 1."""
    examples = []
    for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        keep = attention.bool()
        ids, completion = ids[keep].tolist(), completion[keep].tolist()
        examples.append(Example(ids, [t if c else IGNORE for t, c in zip(ids, completion)]))
    return [Pair(examples[i], examples[N + i]) for i in range(N)]


def dalign_metrics(pairs: list[Pair], policy, reference, pad_id: int, beta: float,
                   variant: PreferenceLoss = PreferenceLoss.SIGMOID) -> dict[str, float]:
    """dalign's objective on these pairs, reference log-probs filled as dalign.dpo.reference_logps does;
    sums turned into means over pairs, as TRL logs them."""
    with torch.no_grad():
        ref = sequence_logps(reference, collate_pairs(pairs, pad_id), mean=variant.length_normalized)
        for i, pair in enumerate(pairs):
            pair.ref_chosen, pair.ref_rejected = float(ref[i]), float(ref[N + i])
        loss, metrics = PreferenceObjective(beta, variant).loss(policy, collate_pairs(pairs, pad_id))
    return {"loss": loss.item() / N, **{k: v / N for k, v in metrics.items()}}


# dalign metric name -> TRL's, compared to TOL
NAMES = {"loss": "loss", "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
         "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}


def test_trl_tokenizes_the_rows_as_dalign_does_and_masks_one_more_newline(peer, world_tokenizer):
    """Same ids; TRL's completion also covers the template's '\\n' after the eos, dalign's labels do not."""
    tok = world_tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for row, tokenized in zip(peer["rows"], peer["tokenized"]):
        for side in ("chosen", "rejected"):
            ours = completion_example(tok, row["prompt"], row[side])
            theirs = tokenized["prompt_ids"] + tokenized[f"{side}_ids"]
            assert ours.input_ids == theirs
            labelled = [t for t, l in zip(ours.input_ids, ours.labels) if l != IGNORE]
            assert labelled + newline == tokenized[f"{side}_ids"]
            assert labelled[-1] == tok.eos_token_id


def test_loss_and_rewards_equal_trl_dpo_trainer(peer, world_tokenizer):
    pairs = pairs_from_trl_batch(peer["batch"])
    ours = dalign_metrics(pairs, peer["policy"], peer["reference"], world_tokenizer.pad_token_id, BETA)
    theirs = peer["logged"]
    # Not a trivial case: policy and reference differ, so the rewards are far from 0.
    assert abs(theirs["rewards/chosen"]) > 0.05 and abs(theirs["rewards/rejected"]) > 0.05
    assert theirs["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert min(abs(theirs["rewards/chosen"]), abs(theirs["rewards/rejected"])) > 0.5
    assert 0 < theirs["rewards/accuracies"] < 1
    for mine, name in NAMES.items():
        assert ours[mine] == pytest.approx(theirs[name], abs=TOL, rel=0), name
    # Summed log-probs (about -112 nats a sequence) agree to float32 precision: TRL's fused LM
    # head sums the token log-probs in another order, a few ulps (about 1e-5) apart.
    for name in ("logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=0), name


def test_the_comparison_can_fail(peer, world_tokenizer):
    """Another beta, or dalign's own labels (no trailing newline), no longer match TRL."""
    theirs = peer["logged"]
    pad = world_tokenizer.pad_token_id
    other_beta = dalign_metrics(pairs_from_trl_batch(peer["batch"]), peer["policy"], peer["reference"], pad, 2 * BETA)
    assert abs(other_beta["loss"] - theirs["loss"]) > 1e-3
    assert abs(other_beta["rewards/chosen"] - theirs["rewards/chosen"]) > 1e-3
    tok = world_tokenizer
    own_labels = [Pair(completion_example(tok, r["prompt"], r["chosen"]), completion_example(tok, r["prompt"], r["rejected"]))
                  for r in peer["rows"]]
    own = dalign_metrics(own_labels, peer["policy"], peer["reference"], pad, BETA)
    assert abs(own["logps/chosen"] - theirs["logps/chosen"]) > 1e-2
    assert abs(own["rewards/chosen"] - theirs["rewards/chosen"]) > TOL


def test_length_normalized_dpo_equals_trl_sigmoid_norm(peer_norm, peer, world_tokenizer):
    """dalign's sigmoid_norm (DPO on mean log-probs, reference ones included) gives TRL's loss.
    TRL logs its rewards from summed log-ratios whatever the loss, so only the loss is compared."""
    pairs = pairs_from_trl_batch(peer_norm["batch"])
    args = pairs, peer_norm["policy"], peer_norm["reference"], world_tokenizer.pad_token_id, NORM_BETA
    theirs = peer_norm["logged"]["loss"]
    assert abs(theirs - math.log(2)) > 1e-2
    assert dalign_metrics(*args, PreferenceLoss.SIGMOID_NORM)["loss"] == pytest.approx(theirs, abs=TOL, rel=0)
    assert abs(dalign_metrics(*args, PreferenceLoss.SIGMOID)["loss"] - theirs) > 1e-2  # the averaging matters


@pytest.mark.parametrize("variant", [PreferenceLoss.IPO, PreferenceLoss.HINGE])
def test_ipo_and_hinge_equal_trl_loss_types(variant, world_tokenizer, tmp_path_factory):
    """TRL's ipo (squared, on per-token mean log-ratios, as dalign's) and hinge give dalign's loss;
    hinge's rewards too (IPO's are logged from summed log-ratios by TRL, from means by dalign)."""
    run = trl_step(world_tokenizer, tmp_path_factory, variant.value)
    pairs = pairs_from_trl_batch(run["batch"])
    args = pairs, run["policy"], run["reference"], world_tokenizer.pad_token_id, BETA
    ours, theirs = dalign_metrics(*args, variant), run["logged"]
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOL, rel=1e-6)
    if variant is PreferenceLoss.HINGE:
        for mine, name in NAMES.items():
            assert ours[mine] == pytest.approx(theirs[name], abs=TOL, rel=0), name
    other = PreferenceLoss.HINGE if variant is PreferenceLoss.IPO else PreferenceLoss.SIGMOID
    assert abs(dalign_metrics(*args, other)["loss"] - theirs["loss"]) > 1e-2  # the loss type matters
