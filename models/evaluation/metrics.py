"""Per-case segmentation metrics: voxel overlap, lesion detection and volume agreement.

Everything here compares one predicted lesion mask with one truth mask on the
same grid (the native DWI grid, where the service reports its volumes), so a
number in the evaluation report means the same thing as the volume in the SR.

Conventions, chosen so that no case silently turns into NaN:

* **Dice** is 1.0 when both masks are empty (nothing to find, nothing found)
  and 0.0 when exactly one is empty.
* **Sensitivity** (voxel-wise recall) is ``None`` when the truth is empty and
  **precision** is ``None`` when the prediction is empty: the ratio has no
  denominator, and reporting 0 or 1 would bias every median.  Summaries
  (:mod:`models.evaluation.report`) skip ``None``.
* **Lesion-wise detection** uses 3-D connected components with full
  (26-) connectivity, the rule :mod:`service.derive.findings` uses to count
  lesions in the SR, so "lesion" means the same thing in both places.
* **Volume class** of a case is the class of its *total* truth lesion volume:
  small < 1.7 mL <= medium <= 14 mL < large (the cut-offs of issue 4 and of
  the SR's size descriptor), and ``"none"`` for a lesion-free case.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

#: 26-connectivity in 3-D: voxels touching by a face, an edge or a corner are one lesion.
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

LESION_FREE = "none"


class VolumeClass(NamedTuple):
    """One stratum of total lesion volume; ``low_ml``/``high_ml`` are its ends in mL."""

    name: str
    low_ml: float
    high_ml: float


#: The volume strata of issue 4, in order.  Boundaries: small < 1.7 <= medium <= 14 < large,
#: i.e. both ends of "medium" are included (as in :mod:`service.derive.findings`), so a
#: lesion of exactly 1.7 mL or exactly 14 mL is medium.
VOLUME_CLASSES: tuple[VolumeClass, ...] = (
    VolumeClass("small", 0.0, 1.7),
    VolumeClass("medium", 1.7, 14.0),
    VolumeClass("large", 14.0, math.inf),
)

#: Every class name a case can have, lesion-free first (the order reports use).
VOLUME_CLASS_NAMES: tuple[str, ...] = (LESION_FREE, *(c.name for c in VOLUME_CLASSES))


def volume_class(volume_ml: float) -> str:
    """The stratum of a total lesion volume: ``"none"``, ``"small"``, ``"medium"`` or ``"large"``.

    0 mL is ``"none"`` (a lesion-free case is a stratum of its own: it can only
    produce false positives).  ``small`` is (0, 1.7), ``medium`` is [1.7, 14]
    and ``large`` is (14, inf): the medium class includes both of its ends.
    """
    if not math.isfinite(volume_ml) or volume_ml < 0:
        raise ValueError(f"lesion volume must be finite and >= 0 mL, got {volume_ml!r}")
    if volume_ml == 0:
        return LESION_FREE
    small, medium, large = VOLUME_CLASSES
    if volume_ml < small.high_ml:
        return small.name
    if volume_ml <= medium.high_ml:
        return medium.name
    return large.name


def _as_mask(array: npt.ArrayLike, what: str) -> npt.NDArray[np.bool_]:
    mask = np.asarray(array)
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{what} mask must be boolean (or 0/1), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _pair(
    pred: npt.ArrayLike, truth: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    p, t = _as_mask(pred, "predicted"), _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"predicted mask {p.shape} and truth mask {t.shape} differ in shape")
    return p, t


@dataclass(frozen=True, slots=True)
class LesionDetection:
    """Lesion-wise detection counts of one case.

    ``tp`` counts *truth* lesions touched by the prediction, ``fn`` truth
    lesions not touched, ``fp`` *predicted* components touching no truth
    lesion.  This is detection, not one-to-one matching: one predicted blob
    covering two truth lesions gives TP = 2, two blobs on one lesion give TP = 1
    and no FP.  ``precision`` = TP / (TP + FP) is ``None`` when nothing was
    predicted, ``recall`` = TP / (TP + FN) is ``None`` when there is no truth
    lesion; ``f1`` = 2 TP / (2 TP + FP + FN) is 1.0 when there are no lesions on
    either side (a correct "no lesion"), so it is always defined.
    """

    tp: int
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float

    def __post_init__(self) -> None:
        if min(self.tp, self.fp, self.fn) < 0:
            raise ValueError(f"negative lesion counts: {self}")


def _components(mask: npt.NDArray[np.bool_], min_voxels: int) -> tuple[npt.NDArray[np.int32], int]:
    """26-connected labels of ``mask`` with components below ``min_voxels`` removed."""
    labels, n = ndi.label(mask, structure=_FULL_CONNECTIVITY)
    labels = np.asarray(labels, dtype=np.int32)
    if n and min_voxels > 1:
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_voxels
        keep[0] = False  # background
        if not keep[1:].all():
            remap = np.zeros(n + 1, dtype=np.int32)
            remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
            labels, n = remap[labels], int(keep.sum())
    return labels, int(n)


def lesion_detection(
    pred: npt.ArrayLike, truth: npt.ArrayLike, *, min_voxels: int = 1
) -> LesionDetection:
    """Lesion-wise TP/FP/FN and F1 of ``pred`` against ``truth`` (3-D, 26-connectivity).

    Components smaller than ``min_voxels`` are dropped from *both* masks before
    matching, so a speck neither counts as a false positive nor "detects" a
    truth lesion, and a truth speck is not a lesion to miss.  Papers differ in
    this threshold; 1 (keep everything) is the default so the numbers do not
    depend on a choice the reader cannot see.
    """
    if min_voxels < 1:
        raise ValueError(f"min_voxels must be >= 1, got {min_voxels}")
    p, t = _pair(pred, truth)
    if p.ndim != 3:
        raise ValueError(f"lesion detection needs 3-D masks, got {p.ndim}-D")
    pred_labels, n_pred = _components(p, min_voxels)
    truth_labels, n_truth = _components(t, min_voxels)
    overlap = (pred_labels > 0) & (truth_labels > 0)
    detected = np.unique(truth_labels[overlap]).size
    pred_hitting = np.unique(pred_labels[overlap]).size
    tp, fn, fp = int(detected), int(n_truth - detected), int(n_pred - pred_hitting)
    denominator = 2 * tp + fp + fn
    return LesionDetection(
        tp=tp,
        fp=fp,
        fn=fn,
        precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / (tp + fn) if tp + fn else None,
        f1=2 * tp / denominator if denominator else 1.0,
    )


@dataclass(frozen=True, slots=True)
class CaseMetrics:
    """Truth vs prediction for one case; see the module docstring for the conventions.

    ``volume_class`` is the class of the truth volume (the stratum the case
    belongs to, whatever the model said).  ``volume_difference_ml`` is
    predicted - truth (positive = over-segmentation), the quantity of the
    Bland-Altman analysis.  ``extra`` holds run details (timings, phantom
    class) that summaries do not use.
    """

    case: str
    vendor: str
    truth_volume_ml: float
    predicted_volume_ml: float
    volume_class: str
    dice: float
    sensitivity: float | None
    precision: float | None
    abs_volume_difference_ml: float
    volume_difference_ml: float
    lesion_tp: int
    lesion_fp: int
    lesion_fn: int
    lesion_f1: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.volume_class not in VOLUME_CLASS_NAMES:
            raise ValueError(f"unknown volume class {self.volume_class!r}")
        if self.truth_volume_ml < 0 or self.predicted_volume_ml < 0:
            raise ValueError(f"negative lesion volume in case {self.case!r}")

    @property
    def lesion_free(self) -> bool:
        """True when the truth has no lesion (the case can only yield false positives)."""
        return self.volume_class == LESION_FREE

    def as_row(self) -> dict[str, Any]:
        """A JSON-ready dict (one row of the report's per-case table)."""
        return asdict(self)


def case_metrics(
    pred: npt.ArrayLike,
    truth: npt.ArrayLike,
    voxel_volume_ml: float,
    *,
    case: str,
    vendor: str,
    min_lesion_voxels: int = 1,
    extra: dict[str, Any] | None = None,
) -> CaseMetrics:
    """All metrics of one case; both masks on the same grid of ``voxel_volume_ml`` voxels."""
    if not (math.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise ValueError(f"voxel volume must be > 0 mL, got {voxel_volume_ml!r}")
    p, t = _pair(pred, truth)
    n_pred, n_truth = int(p.sum()), int(t.sum())
    n_both = int(np.logical_and(p, t).sum())
    truth_ml = n_truth * voxel_volume_ml
    pred_ml = n_pred * voxel_volume_ml
    detection = lesion_detection(p, t, min_voxels=min_lesion_voxels)
    return CaseMetrics(
        case=case,
        vendor=vendor,
        truth_volume_ml=truth_ml,
        predicted_volume_ml=pred_ml,
        volume_class=volume_class(truth_ml),
        dice=2.0 * n_both / (n_pred + n_truth) if n_pred + n_truth else 1.0,
        sensitivity=n_both / n_truth if n_truth else None,
        precision=n_both / n_pred if n_pred else None,
        abs_volume_difference_ml=abs(pred_ml - truth_ml),
        volume_difference_ml=pred_ml - truth_ml,
        lesion_tp=detection.tp,
        lesion_fp=detection.fp,
        lesion_fn=detection.fn,
        lesion_f1=detection.f1,
        extra=dict(extra or {}),
    )
