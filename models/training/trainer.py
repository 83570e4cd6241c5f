"""Train and fine-tune lesion segmentation networks on DWI/ADC studies.

Used by ``strokeseg train`` and ``strokeseg finetune``.  The data are case
folders (``case/dicom/*.dcm`` + ``case/truth/mask.npy``: the layout
:mod:`models.synth.cases` writes and docs/training-data.md describes for a
hospital's own annotated studies), read with the service's own intake and
preprocessing (:mod:`models.training.dataset`), so what is trained is what is
served.

Method (the seeds, adapted to 2 CPU cores):

* loss: Tversky (alpha = beta = 0.5 by default, Alis 2020) plus a BCE term
  (``--bce-weight``, default 1) that keeps the probability map calibrated for
  the service's fixed threshold; Adam; learning rate warm-up then cosine decay;
* validation Dice per epoch on held-out studies; the best epoch's weights are
  kept (``best.pt``), judged by the mean Dice over all validation studies with
  a lesion-free study scoring 1 only when nothing is predicted (so false
  positives count); early stopping after ``patience`` epochs without gain;
* augmentation on the fly (:mod:`models.training.augment`);
* slice-wise networks (``unet2d``) train on batches of slices, sampled so that
  lesion slices are not drowned by normal ones; sequence networks
  (``res-convlstm``, ``preact3d``) train on stacks of neighbouring slices
  (``slab``) with one spatial transform per stack;
* deterministic for a seed on one machine and thread count; ``last.pt`` after
  every epoch holds weights, optimiser, schedule, RNG states and history, so an
  interrupted run continues with ``resume=True`` exactly where it stopped.

Fine-tuning (domain adaptation, both seeds) is the same loop started from a
checkpoint's weights with a lower learning rate and no warm-up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.architectures.registry import (
    SEQUENCE_ARCHITECTURES,
    build_network,
    network_config,
    stack_logits,
    width_config,
)
from models.architectures.unet2d import count_parameters
from models.training.augment import AugmentConfig, augment_batch
from models.training.dataset import CaseArrays
from models.training.losses import per_slice_dice_loss, tversky_loss

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Everything that decides a training run (stored in checkpoints and training.json)."""

    architecture: str = "unet2d"
    width: int = 8
    epochs: int = 30
    lr: float = 2e-3
    warmup_fraction: float = 0.05
    batch_size: int = 16
    slab: int = 8
    crop: int = 96
    seed: int = 0
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    bce_weight: float = 1.0
    per_slice_dice_weight: float = 0.0
    patience: int = 8
    negative_ratio: float = 0.5
    min_steps_per_epoch: int = 20
    augment: bool = True
    threads: int = 2
    threshold: float = 0.5

    @property
    def sequence(self) -> bool:
        return self.architecture in SEQUENCE_ARCHITECTURES


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_dice_mean: float
    val_dice_median: float
    val_volume_abs_error_ml_median: float
    val_false_positive_ml: float
    val_score: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`fit` leaves in ``out``: best.pt, last.pt, training.json."""

    out: Path
    best_epoch: int
    best_val_dice: float
    stopped_early: bool
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0


def dice_score(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / denom


def predict_case(
    net: nn.Module, images: npt.NDArray[Any], *, sequence: bool, batch: int = 32
) -> npt.NDArray[np.float32]:
    """Probabilities (S, H, W) of one case's model-grid stack (S, 2, H, W)."""
    net.eval()
    logits_of = stack_logits(net)
    with torch.no_grad():
        if sequence:
            x = torch.from_numpy(np.asarray(images, dtype=np.float32))
            return torch.sigmoid(logits_of(x))[:, 0].numpy()
        out = []
        for start in range(0, images.shape[0], batch):
            x = torch.from_numpy(np.asarray(images[start : start + batch], dtype=np.float32))
            out.append(torch.sigmoid(logits_of(x))[:, 0].numpy())
    return np.concatenate(out)


def validate(
    net: nn.Module, data: CaseArrays, cases: list[int], *, sequence: bool, threshold: float = 0.5
) -> dict[str, float]:
    """Dice and volume error per study on the model grid (lesion studies); FP mL otherwise."""
    dices: list[float] = []
    all_dices: list[float] = []
    abs_errors: list[float] = []
    false_positive_ml: list[float] = []
    for case in cases:
        idx = data.case_slices(case)
        pred = predict_case(net, data.images[idx], sequence=sequence) >= threshold
        truth = data.targets[idx].astype(np.float32) >= 0.5
        vox = float(data.model_voxel_ml[case])
        all_dices.append(dice_score(pred, truth))
        if truth.any():
            dices.append(dice_score(pred, truth))
            abs_errors.append(abs(float(pred.sum()) - float(truth.sum())) * vox)
        else:
            false_positive_ml.append(float(pred.sum()) * vox)
    nan = float("nan")
    return {
        "dice_mean": float(np.mean(dices)) if dices else nan,
        "dice_median": float(np.median(dices)) if dices else nan,
        "volume_abs_error_ml_median": float(np.median(abs_errors)) if abs_errors else nan,
        "false_positive_ml": float(np.mean(false_positive_ml)) if false_positive_ml else 0.0,
        # Model selection: mean Dice over *all* studies, a lesion-free study
        # scoring 1 only when nothing is predicted, so false positives count.
        "score": float(np.mean(all_dices)) if all_dices else nan,
    }


class _Sampler:
    """Draws training batches (images, targets) from the cached model-grid arrays."""

    def __init__(self, data: CaseArrays, cases: list[int], settings: TrainSettings) -> None:
        self.data = data
        self.settings = settings
        self.cases = cases
        in_train = np.isin(data.case_index, np.asarray(cases, dtype=np.int32))
        area = data.targets.reshape(len(data.targets), -1).astype(np.float32).sum(axis=1)
        head = data.images[:, 0].reshape(len(data.images), -1).astype(np.float32).max(axis=1) > 0.3
        self.positives = np.flatnonzero(in_train & (area >= 0.5))
        self.negatives = np.flatnonzero(in_train & (area < 0.5) & head)
        self.lesion_slices = {c: np.flatnonzero(area[data.case_slices(c)] >= 0.5) for c in cases}

    def steps_per_epoch(self) -> int:
        s = self.settings
        if s.sequence:
            n = len(self.cases)
        else:
            n = math.ceil(len(self.positives) * (1.0 + s.negative_ratio) / s.batch_size)
        return max(s.min_steps_per_epoch, n)

    def epoch_plan(self, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
        """Slice indices of each step of one epoch."""
        s = self.settings
        steps = self.steps_per_epoch()
        if s.sequence:
            cases = rng.choice(np.asarray(self.cases), size=steps, replace=steps > len(self.cases))
            return [self._slab(int(c), rng) for c in cases]
        n_pos = len(self.positives)
        n_neg = min(len(self.negatives), int(round(s.negative_ratio * max(n_pos, 1))))
        pool = np.concatenate([
            self.positives, rng.choice(self.negatives, size=n_neg, replace=False)
        ]) if n_neg else self.positives.copy()
        if len(pool) == 0:
            raise ValueError("no training slices: the training studies contain no head")
        chosen = rng.choice(pool, size=steps * s.batch_size, replace=len(pool) < steps * s.batch_size)
        return [chosen[i * s.batch_size : (i + 1) * s.batch_size] for i in range(steps)]

    def _slab(self, case: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
        idx = self.data.case_slices(case)
        slab = min(self.settings.slab, len(idx))
        lesion = self.lesion_slices[case]
        if len(lesion) and rng.random() < 0.8:
            centre = int(rng.choice(lesion))
            start = int(np.clip(centre - rng.integers(0, slab), 0, len(idx) - slab))
        else:
            start = int(rng.integers(0, len(idx) - slab + 1))
        return idx[start : start + slab]

    def batch(
        self, idx: npt.NDArray[np.int64], rng: np.random.Generator, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        x = torch.from_numpy(self.data.images[idx].astype(np.float32))
        y = torch.from_numpy(self.data.targets[idx].astype(np.float32)).unsqueeze(1)
        if s.augment:
            x, y = augment_batch(x, y, gen, AugmentConfig(), shared=s.sequence)
        return self._crop(x, y, rng)

    def _crop(
        self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of ``crop`` pixels keeping a lesion pixel inside (one crop per stack)."""
        crop = self.settings.crop
        _, _, h, w = x.shape
        if crop >= min(h, w):
            return x, y

        def corner(target: torch.Tensor) -> tuple[int, int]:
            lesion = torch.nonzero(target > 0.5)
            if len(lesion):
                pr, pc = (int(v) for v in lesion[int(rng.integers(len(lesion)))][-2:])
                r0 = int(rng.integers(max(0, pr - crop + 1), min(h - crop, pr) + 1))
                c0 = int(rng.integers(max(0, pc - crop + 1), min(w - crop, pc) + 1))
                return r0, c0
            return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))

        if self.settings.sequence:
            r0, c0 = corner(y[:, 0])
            return x[..., r0 : r0 + crop, c0 : c0 + crop], y[..., r0 : r0 + crop, c0 : c0 + crop]
        xs, ys = [], []
        for i in range(x.shape[0]):
            r0, c0 = corner(y[i, 0])
            xs.append(x[i, :, r0 : r0 + crop, c0 : c0 + crop])
            ys.append(y[i, :, r0 : r0 + crop, c0 : c0 + crop])
        return torch.stack(xs), torch.stack(ys)


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a ``best.pt``/``last.pt`` (or a format-1 ``unet2d.pt``) and its record."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    architecture = checkpoint.get("architecture", "unet2d")
    net = build_network(architecture, checkpoint["config"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval(), checkpoint


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety; the per-epoch line always prints
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=2.0)


def fit(
    data: CaseArrays,
    train_cases: list[int],
    val_cases: list[int],
    out: Path,
    settings: TrainSettings,
    *,
    init_checkpoint: Path | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or fine-tune from ``init_checkpoint``) and write best.pt/last.pt/training.json."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)

    state: dict[str, Any] | None = None
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        saved = TrainSettings(**state["settings"])
        if replace(saved, epochs=settings.epochs, threads=settings.threads) != replace(
            settings, epochs=settings.epochs, threads=settings.threads
        ):
            raise ValueError(f"{last_path} was written with other settings; use another --out")
        architecture, config = state["architecture"], state["config"]
    elif init_checkpoint is not None:
        init_net, init_record = load_checkpoint(init_checkpoint)
        architecture = init_record.get("architecture", "unet2d")
        config = network_config(init_net)
        if architecture != settings.architecture:
            settings = replace(settings, architecture=architecture)
    else:
        architecture = settings.architecture
        config = network_config(build_network(architecture, width_config(architecture, settings.width)))
    net = build_network(architecture, config)
    if state is None and init_checkpoint is not None:
        net.load_state_dict(init_net.state_dict())
    model = stack_logits(net)
    sampler = _Sampler(data, train_cases, settings)
    steps = sampler.steps_per_epoch()
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, _schedule(settings.epochs * steps, settings.warmup_fraction)
    )
    history: list[EpochRecord] = []
    best: dict[str, Any] = {"epoch": 0, "score": -1.0, "dice": float("nan"), "state_dict": None}
    first_epoch = 1
    if state is not None:
        net.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]["numpy"]
        gen.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        history = [EpochRecord(**h) for h in state["history"]]
        best = state["best"]
        first_epoch = int(state["epoch"]) + 1
        echo(f"resuming {out} after epoch {state['epoch']} (best so far: epoch {best['epoch']})")

    echo(
        f"{architecture} {config}: {count_parameters(net)} parameters; "
        f"{len(train_cases)} training / {len(val_cases)} validation studies; "
        f"{len(sampler.positives)} lesion slices; {steps} steps/epoch"
    )
    record_base = {
        "format": CHECKPOINT_FORMAT,
        "architecture": architecture,
        "config": config,
        "settings": asdict(settings),
        "meta": dict(meta or {}),
    }
    stopped_early = False
    for epoch in range(first_epoch, settings.epochs + 1):
        if epoch - int(best["epoch"]) > settings.patience and best["epoch"] > 0:
            stopped_early = True
            echo(f"early stop: no validation gain for {settings.patience} epochs")
            break
        epoch_started = time.perf_counter()
        model.train()
        losses: list[float] = []
        bar = _progress(steps, f"epoch {epoch}/{settings.epochs}", progress)
        for idx in sampler.epoch_plan(rng):
            x, y = sampler.batch(idx, rng, gen)
            logits = model(x)
            loss = tversky_loss(
                logits, y, alpha=settings.tversky_alpha, beta=settings.tversky_beta
            )
            if settings.bce_weight:
                loss = loss + settings.bce_weight * nn.functional.binary_cross_entropy_with_logits(
                    logits, y
                )
            if settings.per_slice_dice_weight:
                loss = loss + settings.per_slice_dice_weight * per_slice_dice_loss(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if bar is not None:
            bar.close()
        metrics = validate(net, data, val_cases, sequence=settings.sequence, threshold=settings.threshold)
        record = EpochRecord(
            epoch=epoch,
            loss=float(np.mean(losses)),
            val_dice_mean=metrics["dice_mean"],
            val_dice_median=metrics["dice_median"],
            val_volume_abs_error_ml_median=metrics["volume_abs_error_ml_median"],
            val_false_positive_ml=metrics["false_positive_ml"],
            val_score=metrics["score"],
            lr=float(scheduler.get_last_lr()[0]),
            seconds=time.perf_counter() - epoch_started,
        )
        history.append(record)
        improved = not math.isnan(record.val_score) and record.val_score > best["score"]
        if improved:
            best = {
                "epoch": epoch,
                "score": record.val_score,
                "dice": record.val_dice_mean,
                "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }
            _atomic_save(
                {**record_base, "state_dict": best["state_dict"], "epoch": epoch,
                 "val_dice_mean": record.val_dice_mean},
                best_path,
            )
        _atomic_save(
            {
                **record_base,
                "state_dict": net.state_dict(),
                "optimizer": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "numpy": rng.bit_generator.state,
                    "generator": gen.get_state(),
                    "torch": torch.get_rng_state(),
                },
                "epoch": epoch,
                "history": [asdict(h) for h in history],
                "best": best,
            },
            last_path,
        )
        echo(  # printed once the epoch is safely on disk
            f"epoch {epoch:3d}/{settings.epochs}  loss {record.loss:.4f}  "
            f"val Dice {record.val_dice_mean:.3f} (median {record.val_dice_median:.3f})  "
            f"|vol err| {record.val_volume_abs_error_ml_median:.2f} mL  "
            f"FP {record.val_false_positive_ml:.2f} mL  score {record.val_score:.3f}  {record.seconds:.0f} s"
            + ("  *best" if improved else "")
        )

    if best["state_dict"] is None:
        raise RuntimeError("training produced no checkpoint (no epoch ran)")
    result = TrainResult(
        out=out,
        best_epoch=int(best["epoch"]),
        best_val_dice=float(best["dice"]),
        stopped_early=stopped_early,
        history=history,
        seconds=time.perf_counter() - started,
    )
    training = {
        **{k: v for k, v in record_base.items() if k != "format"},
        "parameters": count_parameters(net),
        "n_training_studies": len(train_cases),
        "n_validation_studies": len(val_cases),
        "n_lesion_slices": int(len(sampler.positives)),
        "best_epoch": result.best_epoch,
        "best_val_dice_mean": result.best_val_dice,
        "best_val_score": float(best["score"]),
        "stopped_early": stopped_early,
        "history": [asdict(h) for h in history],
        "seconds": result.seconds,
        "torch": torch.__version__,
    }
    tmp = out / "training.json.tmp"
    tmp.write_text(json.dumps(training, indent=2, default=str) + "\n")
    tmp.replace(out / "training.json")
    echo(
        f"best epoch {result.best_epoch}: validation Dice {result.best_val_dice:.3f}; "
        f"{result.seconds / 60:.1f} min; saved {best_path}"
    )
    return result


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
