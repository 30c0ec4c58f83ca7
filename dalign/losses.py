"""Preference losses as pure functions of completion log-probs.

h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), the difference of
the chosen and rejected log-ratios. Implicit rewards are beta * (log pi - log ref). A
length-normalized variant is given per-token mean log-probs instead of sums (the objective
asks for them by the variant's `length_normalized`); a reference-free one ignores the reference
arguments, and its rewards are beta * log pi.

Worked by hand (tests/test_losses.py), policy means chosen -1, rejected -2 (one pair):
- SimPO, beta 2, gamma 0.5: z = 2 * (-1 - -2) - 0.5 = 1.5; loss = log(1 + e^-1.5) = 0.2014133.
- ORPO, beta 0.1: log odds(p) = log p - log(1 - p) with log p the mean log-prob:
  chosen -1 - log(1 - e^-1) = -0.5413249, rejected -2 - log(1 - e^-2) = -1.8545865, ratio 1.3132617;
  loss = 1 (the chosen NLL) + 0.1 * log(1 + e^-1.3132617) = 1.0238183.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class PreferenceLoss(str, Enum):
    SIGMOID = "sigmoid"  # DPO (Rafailov et al.): -log sigmoid(beta * h)
    IPO = "ipo"  # IPO (Azar et al.): (h - 1/(2 beta))^2 on length-averaged log-probs
    HINGE = "hinge"  # SLiC-style: max(0, 1 - beta * h)
    SIGMOID_NORM = "sigmoid_norm"  # length-normalized DPO (Tülu 3; TRL's sigmoid_norm): DPO on mean log-probs
    SIMPO = "simpo"  # SimPO (Meng et al.): -log sigmoid(beta * (mean_w - mean_l) - gamma); no reference
    ORPO = "orpo"  # ORPO (Hong et al.): chosen NLL - beta * log sigmoid(log odds ratio); no reference
    KTO = "kto"  # KTO (Ethayarajh et al.): unpaired desirable/undesirable rows against a reference point (kto_loss)

    @property
    def length_normalized(self) -> bool:
        """Defined on per-token mean log-probs (the others on sums)."""
        return self in (PreferenceLoss.IPO, PreferenceLoss.SIGMOID_NORM, PreferenceLoss.SIMPO, PreferenceLoss.ORPO)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads a frozen reference model's log-probs (SimPO and ORPO do not: no
        reference pass is made for them)."""
        return self not in (PreferenceLoss.SIMPO, PreferenceLoss.ORPO)

    @property
    def needs_pairs(self) -> bool:
        """Whether the loss is defined on (chosen, rejected) pairs of one prompt (KTO is not: it reads
        unpaired rows, each a completion labelled desirable or not)."""
        return self is not PreferenceLoss.KTO


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, variant: PreferenceLoss = PreferenceLoss.SIGMOID,
                    gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (each shape (B,)). `gamma`: SimPO's
    target margin (read by SimPO only)."""
    if not variant.needs_pairs:
        raise ValueError(f"{variant.value} is not a pairwise loss: see kto_loss")
    if not variant.needs_reference:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if variant in (PreferenceLoss.SIGMOID, PreferenceLoss.SIGMOID_NORM):
        losses = -F.logsigmoid(beta * h)
    elif variant is PreferenceLoss.IPO:
        losses = (h - 1 / (2 * beta)) ** 2
    elif variant is PreferenceLoss.HINGE:
        losses = torch.relu(1 - beta * h)
    elif variant is PreferenceLoss.SIMPO:
        losses = -F.logsigmoid(beta * h - gamma)
    else:  # ORPO: log(1 - p) as log1p(-exp(log p)), finite for every log p < 0
        log_odds = (policy_chosen - torch.log1p(-torch.exp(policy_chosen))) \
            - (policy_rejected - torch.log1p(-torch.exp(policy_rejected)))
        losses = -policy_chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al.): the batch's mean KL estimate, policy against
    reference log-probs of mismatched (prompt, completion) rows, floored at 0 and detached (no
    gradient flows through it, as in TRL's KTOTrainer). Worked by hand: policy -10 and -12,
    reference -11 and -12: mean(1, 0) = 0.5; policy -12 and -12, reference -10 and -11: 0."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO losses and rewards of unpaired rows (each (B,); `desirable` a bool mask).
    A desirable row: w_d * (1 - sigmoid(beta * (r - z0))); an undesirable one:
    w_u * (1 - sigmoid(beta * (z0 - r))), with r = log pi - log ref and z0 the reference point.
    Worked by hand, beta 0.1, z0 0.5: desirable r = 2: 1 - sigmoid(0.15) = 0.4625702;
    undesirable r = -1, w_u 1.5: 1.5 * (1 - sigmoid(0.15)) = 0.6938552."""
    ratio = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - reference_point))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - ratio))))
    return losses, beta * ratio.detach()
