"""Export a trained U-Net to ONNX, check parity, and write the model bundle.

    python -m models.export --checkpoint runs/unet2d/unet2d.pt \\
        --out models/zoo/unet2d-phantom/0.1.0 [--metrics metrics.json]

The bundle is what ``service.inference`` loads: ``model.onnx`` (input
``image`` (slices, 2, H, W) float32, output ``probability`` (slices, 1, H, W)
with the sigmoid inside the graph, dynamic axis 0), ``model.yaml`` (the model
card, schema :class:`service.inference.card.ModelCard`) and ``SHA256SUMS``.
Export refuses to write a bundle whose ONNX Runtime output differs from
PyTorch by more than :data:`PARITY_TOLERANCE` at two slice counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.architectures.unet2d import SigmoidHead, UNet2D, UNet2DConfig, count_parameters

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
PARITY_TOLERANCE = 1e-4
PARITY_SLICE_COUNTS = (3, 25)


def load_checkpoint(path: Path) -> UNet2D:
    """The U-Net of a training checkpoint, in eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    net = UNet2D(UNet2DConfig(**{**config, "widths": tuple(config["widths"])}))
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval()


def write_onnx(
    wrapped: torch.nn.Module,
    path: Path,
    *,
    matrix: tuple[int, int],
    opset: int = OPSET,
    example_slices: int = 2,
    required_op: str | None = None,
) -> None:
    """Trace ``wrapped`` ((slices, 2, H, W) -> probabilities) to ONNX with a dynamic slice axis.

    ``required_op`` guards against an exporter silently unrolling a loop: the
    file is removed and RuntimeError raised when the graph lacks that node.
    """
    import onnx

    example = torch.zeros(example_slices, 2, *matrix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notice
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "slices"}, OUTPUT_NAME: {0: "slices"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    if required_op and not any(n.op_type == required_op for n in model.graph.node):
        path.unlink()
        raise RuntimeError(f"exported graph has no {required_op} node (the slice loop was unrolled)")
    model.producer_name = "strokeseg"
    onnx.save(model, str(path))


def export_onnx(
    net: torch.nn.Module, path: Path, *, matrix: tuple[int, int] = (128, 128), opset: int = OPSET
) -> None:
    """Write ``net`` (logits) as an ONNX graph returning probabilities."""
    write_onnx(SigmoidHead(net).eval(), path, matrix=matrix, opset=opset)


def check_parity(
    net: torch.nn.Module,
    onnx_path: Path,
    *,
    matrix: tuple[int, int] = (128, 128),
    slice_counts: tuple[int, ...] = PARITY_SLICE_COUNTS,
    seed: int = 0,
) -> float:
    """Max |ONNX Runtime - PyTorch| over random inputs at several slice counts."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in slice_counts:
        x = np.empty((n, 2, *matrix), dtype=np.float32)
        x[:, 0] = rng.gamma(2.0, 0.5, size=(n, *matrix))  # DWI-like, around 1
        x[:, 1] = rng.uniform(0.0, 3.5, size=(n, *matrix))  # ADC in 1e-3 mm2/s
        with torch.no_grad():
            expected = torch.sigmoid(net.eval()(torch.from_numpy(x))).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reproduce_command(training: dict[str, Any], out_dir: Path) -> str:
    """Train, export, measure, export again with the measured metrics."""
    run = Path(training["args"]["out"])
    export = f"python -m models.export --checkpoint {run / 'unet2d.pt'} --out {out_dir}"
    return " && ".join(
        [
            training["command"],
            export,
            f"python -m models.evaluation --model {out_dir} --seeds 0-9 "
            f"--lesion-free-seeds 10,11,12 --card-metrics {run / 'card-metrics.json'}",
            f"{export} --metrics {run / 'card-metrics.json'}",
        ]
    )


def write_bundle(
    net: UNet2D,
    out_dir: Path,
    *,
    name: str,
    version: str,
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    threshold: float = 0.5,
) -> Path:
    """Export, verify parity and write model.onnx + model.yaml + SHA256SUMS into ``out_dir``."""
    grid = training["grid"]
    matrix = (int(grid["matrix"][0]), int(grid["matrix"][1]))
    onnx_path = out_dir / "model.onnx"
    export_onnx(net, onnx_path, matrix=matrix)
    diff = check_parity(net, onnx_path, matrix=matrix)
    if diff > PARITY_TOLERANCE:
        onnx_path.unlink()
        raise RuntimeError(f"ONNX/PyTorch parity failed: max abs diff {diff:.2e}")
    logger.info("ONNX parity at slices %s: max abs diff %.2e", PARITY_SLICE_COUNTS, diff)
    args = training["args"]
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": (
            "Acute ischaemic stroke lesion segmentation on diffusion MRI (b1000 trace + ADC), "
            "slice-wise 2-D U-Net. Trained only on synthetic phantoms (models.synth): a "
            "reference/integration model, not validated on patient data."
        ),
        "architecture": (
            f"UNet2D widths {list(net.config.widths)}, 2x(conv3x3-BN-ReLU) per level, "
            f"max-pool down, transposed-conv up, {count_parameters(net)} parameters"
        ),
        "file": "model.onnx",
        "sha256": sha256_file(onnx_path),
        "opset": OPSET,
        "input": {
            "name": INPUT_NAME,
            "layout": "slices,channels,rows,columns",
            "channels": ["dwi", "adc"],
            "matrix": list(matrix),
            "pixel_spacing_mm": [float(v) for v in grid["pixel_spacing_mm"]],
        },
        "output": {"name": OUTPUT_NAME, "activation": "sigmoid"},
        "preprocessing_profile": training["preprocessing_profile"],
        "threshold": threshold,
        "intended_use": "Research and integration testing only. Not for diagnosis.",
        "training_data": (
            f"{training['n_studies']} synthetic DWI/ADC studies from models.synth "
            f"(write_phantom_cases seed {args['phantom_seed']}, case seeds >= 1000000; "
            f"{training['n_validation_studies']} held out for validation), read through "
            "service.intake.load_study and service.preprocess.to_model_input. Lesion size "
            "classes small/medium/large/none 30/35/25/10 %."
        ),
        "reproduce": _reproduce_command(training, out_dir),
        "metrics": {
            "onnx_parity_max_abs_diff": float(f"{diff:.3g}"),
            "validation_dice_mean_model_grid": round(float(training["best_val_dice_mean"]), 4),
            "best_epoch": int(training["best_epoch"]),
            "training_minutes": round(float(training["seconds"]["training"]) / 60.0, 1),
            **(metrics or {}),
        },
    }
    (out_dir / "model.yaml").write_text(
        "# Model card: read by service.inference.card.load_model_card.\n"
        + yaml.safe_dump(card, sort_keys=False, width=100)
    )
    sums = "".join(
        f"{sha256_file(out_dir / f)}  {f}\n" for f in ("model.onnx", "model.yaml")
    )
    (out_dir / "SHA256SUMS").write_text(sums)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a U-Net checkpoint as a model bundle")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--training", type=Path, help="training.json (default: beside checkpoint)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="unet2d-phantom")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--metrics", type=Path, help="JSON of measured metrics for the card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    training = json.loads(
        (args.training or args.checkpoint.parent / "training.json").read_text()
    )
    metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    net = load_checkpoint(args.checkpoint)
    out = write_bundle(
        net, args.out, name=args.name, version=args.version, training=training,
        metrics=metrics, threshold=args.threshold,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
