"""dalign's SimPO and ORPO against TRL 1.16's experimental CPOTrainer (loss_type simpo, cpo_alpha 0:
SimPO) and ORPOTrainer, on the same tiny model and pairs, all in one batch, one step at learning
rate 0 (as tests/test_dpo_trl.py does for DPO).

Both trainers tokenize with TRL's older per-answer scheme; the comparison scores TRL's own
sequences with TRL's own labels. SimPO's loss and rewards equal TRL's. ORPO's odds-ratio term and
rewards equal TRL's; its NLL term does not, by design: TRL takes the mean over every token of the
chosen sequences, prompt included, across the batch, while dalign (as the ORPO paper's L_SFT)
takes each chosen answer's mean over its own tokens, then the mean over pairs. The last test pins
TRL's term down to that definition, so the difference is the one named here.
"""

import copy

import pytest
import torch

from dalign.chat import IGNORE
from dalign.dpo import Pair, PreferenceObjective, collate_pairs, sequence_logps
from dalign.losses import PreferenceLoss
from dalign.pretrain import build_model
from dalign.train import Example, collate, token_loss_sum

from test_dpo import TINY, world_pairs
from trl_peer import train_capturing_batches

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
experimental = pytest.importorskip("trl.experimental.cpo"), pytest.importorskip("trl.experimental.orpo")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

N, TOL = 6, 1e-5
SIMPO_BETA, SIMPO_GAMMA, ORPO_LAMBDA = 2.0, 0.5, 0.1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training tests run on one thread: results do not depend on the core count."""


def trl_step(world_tokenizer, folder, trainer_cls, config_cls, **settings) -> dict:
    """One TRL step (learning rate 0) on N world pairs: its batch, its logged metrics and an
    untouched copy of the model it scored them with."""
    rows = world_pairs(N)
    policy = build_model(TINY, world_tokenizer, seed=0)
    with torch.no_grad():  # a sharper model: mean log-probs far from 0 and from each other
        policy.model.norm.weight.mul_(4.0)
    ours = copy.deepcopy(policy).eval()
    args = config_cls(output_dir=str(folder), bf16=False, use_cpu=True, per_device_train_batch_size=N, max_steps=1,
                      learning_rate=0.0, logging_steps=1, report_to=[], save_strategy="no", max_length=1024,
                      dataloader_num_workers=0, **settings)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = trainer_cls(model=policy, args=args, train_dataset=dataset, processing_class=world_tokenizer)
    batches = train_capturing_batches(trainer)
    assert len(batches) == 1 and batches[0]["chosen_input_ids"].shape[0] == N
    logged = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)
    return {"batch": batches[0], "logged": logged, "policy": ours}


@pytest.fixture(scope="module")
def simpo(world_tokenizer, tmp_path_factory):
    return trl_step(world_tokenizer, tmp_path_factory.mktemp("cpo"), experimental[0].CPOTrainer,
                    experimental[0].CPOConfig, loss_type="simpo", cpo_alpha=0.0, beta=SIMPO_BETA,
                    simpo_gamma=SIMPO_GAMMA)


@pytest.fixture(scope="module")
def orpo(world_tokenizer, tmp_path_factory):
    return trl_step(world_tokenizer, tmp_path_factory.mktemp("orpo"), experimental[1].ORPOTrainer,
                    experimental[1].ORPOConfig, beta=ORPO_LAMBDA)


def side(batch: dict, name: str) -> list[Example]:
    """TRL's sequences of one side, without padding, labelled as TRL labels them."""
    made = []
    for ids, attention, labels in zip(batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"],
                                      batch[f"{name}_labels"]):
        keep = attention.bool()
        made.append(Example(ids[keep].tolist(), [t if t != -100 else IGNORE for t in labels[keep].tolist()]))
    return made


def pairs_of(batch: dict) -> list[Pair]:
    return [Pair(c, r) for c, r in zip(side(batch, "chosen"), side(batch, "rejected"))]


def dalign_metrics(pairs: list[Pair], model, pad_id: int, beta: float, variant: PreferenceLoss,
                   gamma: float = 0.0) -> dict[str, float]:
    with torch.no_grad():
        loss, metrics = PreferenceObjective(beta, variant, gamma=gamma).loss(model, collate_pairs(pairs, pad_id))
        chosen = sequence_logps(model, collate_pairs(pairs, pad_id), mean=True)[:len(pairs)]
    return {"loss": loss.item() / N, "chosen_nll": -chosen.mean().item(), **{k: v / N for k, v in metrics.items()}}


NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
         "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies",
         "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected"}


def test_simpo_loss_and_rewards_equal_trl_cpo_trainer_with_loss_type_simpo(simpo, world_tokenizer):
    ours = dalign_metrics(pairs_of(simpo["batch"]), simpo["policy"], world_tokenizer.pad_token_id, SIMPO_BETA,
                          PreferenceLoss.SIMPO, SIMPO_GAMMA)
    theirs = simpo["logged"]
    assert abs(theirs["rewards/margins"]) > 1e-3  # the untrained model's two mean log-probs differ a little
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOL, rel=0)
    for mine, name in NAMES.items():
        assert ours[mine] == pytest.approx(theirs[name], abs=TOL, rel=1e-6), name
    other = dalign_metrics(pairs_of(simpo["batch"]), simpo["policy"], world_tokenizer.pad_token_id, SIMPO_BETA,
                           PreferenceLoss.SIMPO, 0.0)
    assert abs(other["loss"] - theirs["loss"]) > 1e-2  # gamma matters: the comparison can fail


def test_orpo_odds_ratio_term_and_rewards_equal_trl_orpo_trainer(orpo, world_tokenizer):
    ours = dalign_metrics(pairs_of(orpo["batch"]), orpo["policy"], world_tokenizer.pad_token_id, ORPO_LAMBDA,
                          PreferenceLoss.ORPO)
    theirs = orpo["logged"]
    assert abs(theirs["log_odds_ratio"]) > 0.05 and abs(theirs["rewards/margins"]) > 1e-4  # beta 0.1 makes it small
    # The odds-ratio term: dalign's loss less its NLL, TRL's loss less its NLL.
    assert ours["loss"] - ours["chosen_nll"] == pytest.approx(theirs["loss"] - theirs["nll_loss"], abs=TOL, rel=0)
    assert -ORPO_LAMBDA * theirs["log_odds_ratio"] == pytest.approx(ours["loss"] - ours["chosen_nll"], abs=TOL, rel=0)
    for mine, name in NAMES.items():
        assert ours[mine] == pytest.approx(theirs[name], abs=TOL, rel=1e-6), name


def test_trl_orpo_nll_is_the_token_mean_over_whole_chosen_sequences_where_dalign_averages_answers(orpo, world_tokenizer):
    chosen = side(orpo["batch"], "chosen")
    pad = world_tokenizer.pad_token_id
    whole = [Example(e.input_ids, list(e.input_ids)) for e in chosen]  # every token labelled, prompt included
    with torch.no_grad():
        total, count = token_loss_sum(orpo["policy"], collate([[e] for e in whole], pad))
    theirs = orpo["logged"]["nll_loss"]
    assert total.item() / count == pytest.approx(theirs, abs=TOL, rel=0)
    ours = dalign_metrics(pairs_of(orpo["batch"]), orpo["policy"], pad, ORPO_LAMBDA, PreferenceLoss.ORPO)["chosen_nll"]
    assert abs(ours - theirs) > 1e-3  # the two definitions differ on these rows
