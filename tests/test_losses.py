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


def test_only_ipo_is_length_normalized():
    assert [v.length_normalized for v in PreferenceLoss] == [False, True, False]
