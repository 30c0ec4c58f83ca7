"""Preference losses against numbers worked out by hand.

Pair A: log-probs policy chosen -10, policy rejected -12, reference -11 and -11, beta 0.1.
  chosen ratio +1, rejected ratio -1, h = 2.
  sigmoid: -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
  ipo:     (2 - 1/(2*0.1))^2 = (2 - 5)^2 = 9
  hinge:   max(0, 1 - 0.1*2) = 0.8
  rewards: chosen 0.1*1 = 0.1, rejected 0.1*-1 = -0.1
Pair B: policy -5 and -4, reference -5 and -5, beta 0.1: chosen ratio 0, rejected ratio +1, h = -1.
  sigmoid: log(1 + e^0.1) = log(2.1051709) = 0.7443967
  ipo:     (-1 - 5)^2 = 36
  hinge:   1 - 0.1*-1 = 1.1
  rewards: chosen 0, rejected 0.1
"""

import pytest
import torch

from dalign.losses import PreferenceLoss, preference_loss

PAIRS = dict(policy_chosen=torch.tensor([-10.0, -5.0]), policy_rejected=torch.tensor([-12.0, -4.0]),
             ref_chosen=torch.tensor([-11.0, -5.0]), ref_rejected=torch.tensor([-11.0, -5.0]), beta=0.1)


@pytest.mark.parametrize("variant, expected", [
    (PreferenceLoss.SIGMOID, [0.5981389, 0.7443967]),
    (PreferenceLoss.IPO, [9.0, 36.0]),
    (PreferenceLoss.HINGE, [0.8, 1.1]),
])
def test_losses_match_hand_computed_values(variant, expected):
    losses, chosen, rejected = preference_loss(**PAIRS, variant=variant)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.1, 0.0]), atol=1e-7)
    assert torch.allclose(rejected, torch.tensor([-0.1, 0.1]), atol=1e-7)


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    loss, _, _ = preference_loss(pc, pr, torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    loss.sum().backward()
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2) = -0.0450166
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.0450166, abs=1e-6)


def test_which_variants_are_length_normalized_and_reference_free():
    assert [v.length_normalized for v in PreferenceLoss] == [False, True, False, True, True, True, False]
    assert [v.needs_reference for v in PreferenceLoss] == [True, True, True, True, False, False, True]
    assert [v.needs_pairs for v in PreferenceLoss] == [True] * 6 + [False]


# Mean log-probs (the length-normalized variants are given means): chosen -1 and -0.5, rejected -2 and -0.4.
MEANS = dict(policy_chosen=torch.tensor([-1.0, -0.5]), policy_rejected=torch.tensor([-2.0, -0.4]),
             ref_chosen=torch.tensor([-3.0, -3.0]), ref_rejected=torch.tensor([-1.0, -1.0]))


def test_length_normalized_dpo_is_dpo_on_mean_log_probs():
    """Given means, sigmoid_norm is DPO's formula (the averaging is the objective's: TRL's equality test)."""
    norm, c, r = preference_loss(**MEANS, beta=0.1, variant=PreferenceLoss.SIGMOID_NORM)
    plain, c2, r2 = preference_loss(**MEANS, beta=0.1, variant=PreferenceLoss.SIGMOID)
    # h = (-1 - -3) - (-2 - -1) = 3: log(1 + e^-0.3) = 0.5543552; pair 2: h = 2.5 - 0.6 = 1.9: log(1 + e^-0.19) = 0.6026529
    assert torch.allclose(norm, torch.tensor([0.5543552, 0.6026529]), atol=1e-6)
    assert torch.equal(norm, plain) and torch.equal(c, c2) and torch.equal(r, r2)


def test_simpo_matches_hand_computed_values_and_ignores_the_reference():
    """beta 2, gamma 0.5. Pair 1: z = 2 * (-1 - -2) - 0.5 = 1.5, log(1 + e^-1.5) = 0.2014133.
    Pair 2: z = 2 * (-0.5 - -0.4) - 0.5 = -0.7, log(1 + e^0.7) = 1.1031860. Rewards 2 * mean."""
    losses, chosen, rejected = preference_loss(**MEANS, beta=2.0, variant=PreferenceLoss.SIMPO, gamma=0.5)
    assert torch.allclose(losses, torch.tensor([0.2014133, 1.1031860]), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([-2.0, -1.0])) and torch.allclose(rejected, torch.tensor([-4.0, -0.8]))
    other_reference = {**MEANS, "ref_chosen": torch.tensor([5.0, 5.0])}
    assert torch.equal(preference_loss(**other_reference, beta=2.0, variant=PreferenceLoss.SIMPO, gamma=0.5)[0], losses)
    assert not torch.allclose(preference_loss(**MEANS, beta=2.0, variant=PreferenceLoss.SIMPO, gamma=0.0)[0], losses)


def test_orpo_matches_hand_computed_values():
    """beta 0.1; log odds = m - log(1 - e^m) of a mean log-prob m.
    Pair 1: chosen -0.5413249, rejected -1.8545865, ratio 1.3132617: 1 + 0.1 * log(1 + e^-1.3132617) = 1.0238183.
    Pair 2: chosen 0.4327521, rejected 0.7096329, ratio -0.2768808: 0.5 + 0.1 * log(1 + e^0.2768808) = 0.5841140."""
    losses, chosen, _ = preference_loss(**MEANS, beta=0.1, variant=PreferenceLoss.ORPO)
    assert torch.allclose(losses, torch.tensor([1.0238183, 0.5841140]), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([-0.1, -0.05]))
    pc = torch.tensor([-1.0], requires_grad=True)
    preference_loss(pc, torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1), 0.1, PreferenceLoss.ORPO)[0].sum().backward()
    assert pc.grad.item() < -1.0  # the NLL's -1, and the odds-ratio term pushes the chosen up too


def test_kto_matches_hand_computed_values():
    from dalign.losses import kto_loss, kto_reference_point

    z0 = kto_reference_point(torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -12.0]))
    assert z0.item() == pytest.approx(0.5)
    assert kto_reference_point(torch.tensor([-12.0, -12.0]), torch.tensor([-10.0, -11.0])).item() == 0.0  # floored
    losses, rewards = kto_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-12.0, -11.0]), torch.tensor([True, False]),
                               z0, beta=0.1, undesirable_weight=1.5)
    assert torch.allclose(losses, torch.tensor([0.4625702, 0.6938552]), atol=1e-6)
    assert torch.allclose(rewards, torch.tensor([0.2, -0.1]))
    pc = torch.tensor([-10.0, -12.0], requires_grad=True)
    kto_loss(pc, torch.tensor([-12.0, -11.0]), torch.tensor([True, False]), z0, 0.1)[0].sum().backward()
    assert pc.grad[0] < 0 < pc.grad[1]  # the desirable row's log-prob pushed up, the undesirable one's down
