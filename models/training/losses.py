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


def per_slice_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Mean, over the slices that hold lesion, of 1 - soft Dice on that slice alone.

    The batch-pooled Tversky counts voxels: in a batch with a slice of a 40 mL infarct and a
    slice of a 0.5 mL lacune the lacune is a rounding error, and small lesions are where the
    held-out Dice was lowest (models/README.md). Here every lesion slice weighs the same.
    Slices without lesion are left to the pooled term and BCE (a per-slice Dice of an empty
    slice is undefined). Dimension 0 is the slice (a batch of slices, or one slab).
    """
    prob = torch.sigmoid(logits).flatten(1)
    truth = target.flatten(1)
    area = truth.sum(dim=1)
    has_lesion = area >= 0.5
    if not bool(has_lesion.any()):
        return logits.sum() * 0.0
    dice = (2.0 * (prob * truth).sum(dim=1) + smooth) / (prob.sum(dim=1) + area + smooth)
    return (1.0 - dice[has_lesion]).mean()
