"""dalign's KTO loss, reference point and rewards equal TRL's KTOTrainer on the same tiny model and rows.

As tests/test_dpo_trl.py does for DPO: one TRL step (learning rate 0) on N unpaired rows, all in
one batch, its batch captured; dalign's objective then scores TRL's own sequences (its completion
mask as the labels: one token more than dalign's, the template's newline after the eos). The rows
are given to TRL in the order of dalign's seeded cycle, so TRL's in-batch rotation makes the same
mismatched sequences dalign.kto.make_rows makes, which a second test checks id for id.
"""

import copy
from collections import Counter

import pytest
import torch

from dalign.chat import IGNORE
from dalign.dpo import collate_pairs, sequence_logps
from dalign.kto import KTOObjective, UnpairedRow, make_rows, mismatch_cycle
from dalign.pretrain import build_model
from dalign.train import Example

from test_dpo import TINY, world_pairs
from test_dpo_trl import far_copy
from trl_peer import train_capturing_batches

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 0.1, 1.0, 1.6  # in the range KTO recommends for 4:2
N = 6  # rows, all in one batch: 4 desirable, 2 undesirable
SEED = 3
TOL = 1e-5


class OneProcess:
    """What KTOObjective.begin_step asks of the accelerator, for one process."""

    @staticmethod
    def gather(tensor):
        return tensor


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


def unpaired_rows() -> list[dict]:
    pairs = world_pairs(N)
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i < 4 else p["rejected"], "label": i < 4}
            for i, p in enumerate(pairs)]


def cycle_order(rows: list[dict]) -> list[dict]:
    """The rows in dalign's cycle order (dalign.kto.mismatch_cycle): TRL's rotation by one then
    pairs each prompt with the completion dalign pairs it with."""
    return [rows[i] for i in mismatch_cycle(len(rows), SEED)]


@pytest.fixture(scope="module")
def peer(world_tokenizer, tmp_path_factory):
    rows = cycle_order(unpaired_rows())
    policy = build_model(TINY, world_tokenizer, seed=0)
    reference = far_copy(policy)
    ours = copy.deepcopy(policy).eval(), copy.deepcopy(reference).eval()
    args = trl.KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, use_cpu=True, beta=BETA,
                         desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT,
                         per_device_train_batch_size=N, max_steps=1, learning_rate=0.0, logging_steps=1,
                         report_to=[], save_strategy="no", activation_checkpointing=False,
                         precompute_ref_log_probs=False, max_length=None, dataloader_num_workers=0,
                         train_sampling_strategy="sequential")
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=world_tokenizer)
    batches = train_capturing_batches(trainer)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == N
    logged = next(entry for entry in trainer.state.log_history if "kl" in entry)
    return {"rows": rows, "batch": batches[0], "logged": logged, "policy": ours[0], "reference": ours[1]}


def rows_from_trl_batch(batch: dict) -> list[UnpairedRow]:
    """dalign rows holding exactly TRL's sequences (its own and its KL ones), labelled where TRL's
    completion masks are 1."""
    def examples(prefix: str) -> list[Example]:
        made = []
        for ids, attention, completion in zip(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                              batch[f"{prefix}completion_mask"]):
            keep = attention.bool()
            ids, completion = ids[keep].tolist(), completion[keep].tolist()
            made.append(Example(ids, [t if c else IGNORE for t, c in zip(ids, completion)]))
        return made
    return [UnpairedRow(own, kl, desirable=bool(label))
            for own, kl, label in zip(examples(""), examples("KL_"), batch["label"])]


def dalign_metrics(rows: list[UnpairedRow], policy, reference, pad_id: int, beta: float = BETA,
                   weights: tuple[float, float] = (DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT)) -> dict[str, float]:
    """dalign's KTO objective on these rows as its loop runs it (begin_step, then the loss), the
    sums turned into TRL's means (over rows; over a label's rows for its rewards and log-probs)."""
    with torch.no_grad():
        ref = sequence_logps(reference, collate_pairs(rows, pad_id))
        for i, row in enumerate(rows):
            row.ref_chosen, row.ref_rejected = float(ref[i]), float(ref[N + i])
        batch = {**collate_pairs(rows, pad_id), "desirable": torch.tensor([r.desirable for r in rows])}
        objective = KTOObjective(beta, *weights)
        objective.begin_step(policy, [batch], OneProcess())
        loss, m = objective.loss(policy, batch)
    good = m["desirable"]
    return {"loss": loss.item() / N, "kl": m["kl"] / N, "rewards/chosen": m["rewards/desirable"] / good,
            "rewards/rejected": m["rewards/undesirable"] / (N - good), "logps/chosen": m["logps/desirable"] / good,
            "logps/rejected": m["logps/undesirable"] / (N - good)}


def test_loss_reference_point_and_rewards_equal_trl_kto_trainer(peer, world_tokenizer):
    ours = dalign_metrics(rows_from_trl_batch(peer["batch"]), peer["policy"], peer["reference"],
                          world_tokenizer.pad_token_id)
    theirs = peer["logged"]
    # Not a trivial case: the reference point is above 0 (not floored) and the rewards far from 0.
    assert theirs["kl"] > 0.05
    assert min(abs(theirs["rewards/chosen"]), abs(theirs["rewards/rejected"])) > 0.05
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert ours[name] == pytest.approx(theirs[name], abs=TOL, rel=0), name
    for name in ("logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=0), name


def test_the_comparison_can_fail(peer, world_tokenizer):
    """Other weights, or no reference point, no longer give TRL's loss."""
    rows = rows_from_trl_batch(peer["batch"])
    args = rows, peer["policy"], peer["reference"], world_tokenizer.pad_token_id
    theirs = peer["logged"]["loss"]
    assert abs(dalign_metrics(*args, weights=(1.0, 1.0))["loss"] - theirs) > 1e-3
    unpaired = [UnpairedRow(r.chosen, r.chosen, desirable=r.desirable) for r in rows]  # z0 = mean reward instead
    assert abs(dalign_metrics(unpaired, *args[1:])["loss"] - theirs) > 1e-4


def test_dalign_mismatches_the_rows_as_trl_rotates_them(peer, world_tokenizer):
    """TRL's sequences, own and KL, are dalign's (ids), row for row in the cycle's order."""
    made = make_rows(unpaired_rows(), world_tokenizer, 10_000, Counter(), SEED)
    made = [made[i] for i in mismatch_cycle(N, SEED)]
    theirs = rows_from_trl_batch(peer["batch"])
    assert [m.chosen.input_ids for m in made] == [t.chosen.input_ids for t in theirs]
    assert [m.rejected.input_ids for m in made] == [t.rejected.input_ids for t in theirs]
    assert [m.desirable for m in made] == [t.desirable for t in theirs]
    assert all(m.rejected.input_ids != m.chosen.input_ids for m in made)  # every row mismatched
