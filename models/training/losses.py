"""Losses for lesion segmentation with heavy class imbalance."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    """1 - Tversky index over the whole batch (alpha = beta = 0.5 is soft Dice).

    Summing over the batch rather than per slice keeps the loss defined and
    stable for the many slices without lesion; ``alpha`` weighs false
    positives, ``beta`` false negatives.
    """
    prob = torch.sigmoid(logits)
    tp = (prob * target).sum()
    fp = (prob * (1.0 - target)).sum()
    fn = ((1.0 - prob) * target).sum()
    return 1.0 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def tversky_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0
) -> torch.Tensor:
    """Tversky(0.5, 0.5) for overlap plus BCE for calibrated probabilities.

    BCE keeps the probability map meaningful away from lesions (the service
    thresholds it at the card's threshold), Tversky fights the imbalance.
    """
    return tversky_loss(logits, target) + bce_weight * F.binary_cross_entropy_with_logits(
        logits, target
    )
