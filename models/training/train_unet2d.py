"""Train the 2-D U-Net on phantom studies, read through the service's own code path.

    python -m models.training.train_unet2d --cases 200 --epochs 14 --seed 0 --out runs/unet2d

Steps: (1) write the training phantoms into a cache folder (case seeds derived
from ``--phantom-seed``, >= 1000, disjoint from the test seeds < 1000),
(2) read every study with ``service.intake.load_study`` and
``service.preprocess.to_model_input`` (cached as .npz), (3) train on slices
with flips and intensity jitter, validating per epoch on held-out studies,
(4) save ``unet2d.pt`` and ``training.json`` (history, timings, the exact
command) in ``--out``.  Export with :mod:`models.export`.

Deterministic for a given ``--seed`` on a given machine/thread count (CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.architectures.unet2d import UNet2D, UNet2DConfig, count_parameters
from models.synth import write_phantom_cases
from models.training.dataset import CaseArrays, load_case_arrays
from models.training.losses import tversky_bce_loss
from service.preprocess import DEFAULT_PROFILE, ModelGrid

logger = logging.getLogger(__name__)

DEFAULT_WIDTHS = (8, 16, 32, 64, 96)


def dice_score(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / denom


def predict_slices(net: torch.nn.Module, images: npt.NDArray[Any], batch: int = 32) -> np.ndarray:
    """Probabilities (S, H, W) for model-grid images (S, 2, H, W)."""
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            x = torch.from_numpy(np.asarray(images[start : start + batch], dtype=np.float32))
            out.append(torch.sigmoid(net(x))[:, 0].numpy())
    return np.concatenate(out)


def validate(
    net: torch.nn.Module, data: CaseArrays, cases: list[int], threshold: float = 0.5
) -> dict[str, float]:
    """Per-study Dice and volume error on the model grid (studies with a lesion)."""
    dices: list[float] = []
    rel_errors: list[float] = []
    false_positive_ml: list[float] = []
    for case in cases:
        idx = data.case_slices(case)
        prob = predict_slices(net, data.images[idx])
        pred = prob >= threshold
        truth = data.targets[idx].astype(np.float32) >= 0.5
        vox = float(data.model_voxel_ml[case])
        if data.truth_volume_ml[case] > 0:
            dices.append(dice_score(pred, truth))
            truth_ml = float(truth.sum()) * vox
            rel_errors.append(abs(float(pred.sum()) * vox - truth_ml) / max(truth_ml, 1e-6))
        else:
            false_positive_ml.append(float(pred.sum()) * vox)
    return {
        "dice_mean": float(np.mean(dices)) if dices else float("nan"),
        "dice_median": float(np.median(dices)) if dices else float("nan"),
        "volume_rel_error_median": float(np.median(rel_errors)) if rel_errors else float("nan"),
        "false_positive_ml_no_lesion": float(np.mean(false_positive_ml))
        if false_positive_ml
        else 0.0,
    }


def _augment(
    rng: np.random.Generator,
    images: npt.NDArray[np.float16],
    targets: npt.NDArray[np.float16],
    idx: npt.NDArray[np.int64],
    crop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (lesion kept inside), left-right flips, intensity jitter."""
    _, _, h, w = images.shape
    xs = np.empty((len(idx), 2, crop, crop), dtype=np.float32)
    ys = np.empty((len(idx), 1, crop, crop), dtype=np.float32)
    for n, i in enumerate(idx):
        target = targets[i]
        lesion = np.argwhere(target > 0.5)
        if len(lesion) and crop < h:
            pr, pc = lesion[rng.integers(len(lesion))]
            r0 = int(rng.integers(max(0, pr - crop + 1), min(h - crop, pr) + 1))
            c0 = int(rng.integers(max(0, pc - crop + 1), min(w - crop, pc) + 1))
        else:
            r0 = int(rng.integers(0, h - crop + 1))
            c0 = int(rng.integers(0, w - crop + 1))
        x = images[i, :, r0 : r0 + crop, c0 : c0 + crop].astype(np.float32)
        y = target[r0 : r0 + crop, c0 : c0 + crop].astype(np.float32)
        if rng.random() < 0.5:  # columns run right -> left: a left-right mirror
            x = x[:, :, ::-1]
            y = y[:, ::-1]
        x[0] *= float(np.exp(rng.normal(0.0, 0.15)))
        x[1] *= float(np.exp(rng.normal(0.0, 0.05)))
        xs[n] = x
        ys[n, 0] = y
    return torch.from_numpy(xs), torch.from_numpy(ys)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole training; returns the training record written to training.json."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    phantom_dir = Path(args.cache_dir) / f"train-{args.phantom_seed}"
    t0 = time.perf_counter()
    case_dirs = write_phantom_cases(
        phantom_dir, args.cases, args.phantom_seed, workers=args.workers, skip_existing=True
    )
    phantom_s = time.perf_counter() - t0
    print(f"phantoms ready in {phantom_dir} ({phantom_s:.0f} s)", flush=True)

    grid = ModelGrid()
    t0 = time.perf_counter()
    data = load_case_arrays(case_dirs, grid, DEFAULT_PROFILE, cache_dir=Path(args.cache_dir))
    preprocess_s = time.perf_counter() - t0
    print(
        f"model inputs: {data.images.shape[0]} slices of {data.n_cases} studies "
        f"({preprocess_s:.0f} s, grid {grid.matrix} @ {grid.pixel_spacing_mm} mm)",
        flush=True,
    )

    n_val = max(1, int(round(args.val_fraction * data.n_cases)))
    val_cases = list(range(data.n_cases - n_val, data.n_cases))
    train_mask = data.case_index < data.n_cases - n_val
    lesion_area = data.targets.reshape(len(data.targets), -1).astype(np.float32).sum(axis=1)
    has_head = data.images[:, 0].reshape(len(data.images), -1).astype(np.float32).max(axis=1) > 0.3
    positives = np.flatnonzero(train_mask & (lesion_area >= 0.5))
    negatives = np.flatnonzero(train_mask & (lesion_area < 0.5) & has_head)
    n_negatives = int(round(args.negative_ratio * len(positives)))
    steps_per_epoch = int(math.ceil((len(positives) + n_negatives) / args.batch_size))
    print(
        f"train slices: {len(positives)} with lesion, {len(negatives)} without; "
        f"{steps_per_epoch} steps/epoch; validation studies: {n_val}",
        flush=True,
    )

    config = UNet2DConfig(widths=tuple(int(w) for w in args.widths.split(",")))
    net = UNet2D(config)
    print(f"UNet2D widths {config.widths}: {count_parameters(net)} parameters", flush=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"dice_mean": -1.0}
    train_started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        net.train()
        chosen = np.concatenate(
            [positives, rng.choice(negatives, size=n_negatives, replace=False)]
        )
        rng.shuffle(chosen)
        losses = []
        for step in range(steps_per_epoch):
            batch = chosen[step * args.batch_size : (step + 1) * args.batch_size]
            if len(batch) < 2:
                continue
            x, y = _augment(rng, data.images, data.targets, batch, args.crop)
            loss = tversky_bce_loss(net(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        metrics = validate(net, data, val_cases)
        record = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            **{f"val_{k}": v for k, v in metrics.items()},
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        print(
            f"epoch {epoch:3d}/{args.epochs}  loss {record['loss']:.4f}  "
            f"val Dice {metrics['dice_mean']:.3f} (median {metrics['dice_median']:.3f})  "
            f"vol err {metrics['volume_rel_error_median']:.3f}  "
            f"FP {metrics['false_positive_ml_no_lesion']:.2f} mL  "
            f"{record['seconds']:.0f} s",
            flush=True,
        )
        if metrics["dice_mean"] > best["dice_mean"]:
            best = {
                "epoch": epoch,
                "dice_mean": metrics["dice_mean"],
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }

    train_s = time.perf_counter() - train_started
    torch.save(
        {"config": asdict(config), "state_dict": best["state"], "epoch": best["epoch"]},
        out / "unet2d.pt",
    )
    record_out: dict[str, Any] = {
        "command": "python -m models.training.train_unet2d " + shlex.join(args.argv),
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "argv"
        },
        "config": asdict(config),
        "parameters": count_parameters(net),
        "grid": {"matrix": list(grid.matrix), "pixel_spacing_mm": list(grid.pixel_spacing_mm)},
        "preprocessing_profile": DEFAULT_PROFILE,
        "phantom_dir": str(phantom_dir),
        "n_studies": data.n_cases,
        "n_validation_studies": n_val,
        "n_lesion_slices": int(len(positives)),
        "best_epoch": best["epoch"],
        "best_val_dice_mean": best["dice_mean"],
        "history": history,
        "seconds": {
            "phantoms": phantom_s,
            "preprocess": preprocess_s,
            "training": train_s,
            "total": time.perf_counter() - started,
        },
        "torch": torch.__version__,
        "threads": args.threads,
    }
    (out / "training.json").write_text(json.dumps(record_out, indent=2) + "\n")
    print(
        f"best epoch {best['epoch']} val Dice {best['dice_mean']:.3f}; "
        f"training {train_s / 60:.1f} min, total {record_out['seconds']['total'] / 60:.1f} min; "
        f"saved {out / 'unet2d.pt'}",
        flush=True,
    )
    return record_out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="training phantom studies")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, sampling)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--phantom-seed", type=int, default=1000, help="phantom batch seed (>= 1000)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("var/phantoms"))
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--negative-ratio", type=float, default=0.5,
        help="lesion-free slices per lesion slice in each epoch",
    )
    parser.add_argument("--crop", type=int, default=96, help="training crop (multiple of 16)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--widths", default=",".join(str(w) for w in DEFAULT_WIDTHS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="processes writing phantoms")
    args = parser.parse_args(argv)
    if args.phantom_seed < 1000:
        parser.error("--phantom-seed must be >= 1000 (seeds < 1000 are reserved for tests)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
