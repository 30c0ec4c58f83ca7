"""Preference losses as pure functions of summed completion log-probs.

h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), the difference of
the chosen and rejected log-ratios. Implicit rewards are beta * (log pi - log ref).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class PreferenceLoss(str, Enum):
    SIGMOID = "sigmoid"  # DPO (Rafailov et al.): -log sigmoid(beta * h)
    IPO = "ipo"  # IPO (Azar et al.): (h - 1/(2 beta))^2 on length-averaged log-probs
    HINGE = "hinge"  # SLiC-style: max(0, 1 - beta * h)

    @property
    def length_normalized(self) -> bool:
        """IPO is defined on per-token mean log-probs, the others on sums."""
        return self is PreferenceLoss.IPO


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, variant: PreferenceLoss = PreferenceLoss.SIGMOID
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (each shape (B,))."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if variant is PreferenceLoss.SIGMOID:
        losses = -F.logsigmoid(beta * h)
    elif variant is PreferenceLoss.IPO:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
