"""Export a trained U-Net to ONNX, check parity, and write the model bundle.

    strokeseg export runs/unet2d/best.pt --out models/zoo/unet2d-realanat/0.7.0 [--metrics m.json]

The bundle is what ``service.inference`` loads: ``model.onnx`` (input
``image`` (slices, 2, H, W) float32, output ``probability`` (slices, 1, H, W)
with the sigmoid inside the graph, dynamic axis 0), ``model.yaml`` (the model
card, schema :class:`service.inference.card.ModelCard`) and ``SHA256SUMS``.
Export refuses to write a bundle whose ONNX Runtime output differs from
PyTorch by more than :data:`PARITY_TOLERANCE` at two slice counts.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.architectures.unet2d import SigmoidHead
from service.inference.card import sha256_of

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
PARITY_TOLERANCE = 1e-4
PARITY_SLICE_COUNTS = (3, 25)


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


def export_network(net: torch.nn.Module, path: Path, *, matrix: tuple[int, int]) -> float:
    """Export any registered architecture and return its ONNX/PyTorch parity.

    The slice-wise U-Net is traced as is; the seed networks go through
    :func:`models.export_seed.export_seed_onnx` (ConvLSTM loop kept as an
    ONNX Loop, 3-D stack adapter) and are checked at slice counts other than
    the export example's, so a frozen loop cannot pass.
    """
    from models.architectures.registry import architecture_of, stack_logits

    if architecture_of(net) == "unet2d":
        export_onnx(net, path, matrix=matrix)
        return check_parity(net, path, matrix=matrix)
    from models.export_seed import SEED_PARITY_SLICE_COUNTS, export_seed_onnx

    export_seed_onnx(net, path, matrix=matrix)
    return check_parity(
        stack_logits(net).eval(), path, matrix=matrix, slice_counts=SEED_PARITY_SLICE_COUNTS
    )


def write_bundle(
    net: torch.nn.Module,
    out_dir: Path,
    *,
    name: str,
    version: str,
    record: dict[str, Any],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    threshold: float = 0.5,
    min_component_peak: float = 0.0,
    training_data: str | None = None,
    reproduce: str = "",
    checkpoint: Path | None = None,
    test_time_augmentation: tuple[str, ...] = (),
    profile: str | None = None,
) -> Path:
    """Export, verify parity and write model.onnx + model.yaml + SHA256SUMS into ``out_dir``.

    ``record`` is the checkpoint (architecture, config, meta with the model
    grid and preprocessing profile); ``training`` its run's training.json.
    ``profile`` overrides the checkpoint's preprocessing profile (a refinement that feeds the
    training data the same input, such as b1000eq v2 -> v3 for a network trained at b~1000).
    """
    from models.architectures.registry import architecture_of, describe, network_config
    from models.architectures.unet2d import count_parameters

    meta = record.get("meta", {})
    training = training or {}
    grid = meta.get("grid", {"matrix": [128, 128], "pixel_spacing_mm": [1.8, 1.8]})
    matrix = (int(grid["matrix"][0]), int(grid["matrix"][1]))
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    diff = export_network(net.eval(), onnx_path, matrix=matrix)
    if diff > PARITY_TOLERANCE:
        onnx_path.unlink()
        raise RuntimeError(f"ONNX/PyTorch parity failed: max abs diff {diff:.2e}")
    logger.info("ONNX parity: max abs diff %.2e", diff)
    domains = meta.get("training_domains") or []
    n_train = training.get("n_training_studies", len(meta.get("training_studies", [])))
    n_val = training.get("n_validation_studies", len(meta.get("validation_studies", [])))
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": (
            "Acute ischaemic stroke lesion segmentation on diffusion MRI (b1000 trace + ADC). "
            "Trained only on synthetic phantoms (models.synth) unless the training data say "
            "otherwise: a reference/integration model, not validated on patient data."
        ),
        "architecture": describe(net),
        "network": {
            "architecture": architecture_of(net),
            "config": network_config(net),
            "parameters": count_parameters(net),
        },
        "file": "model.onnx",
        "sha256": sha256_of(onnx_path),
        "opset": OPSET,
        "input": {
            "name": INPUT_NAME,
            "layout": "slices,channels,rows,columns",
            "channels": ["dwi", "adc"],
            "matrix": list(matrix),
            "pixel_spacing_mm": [float(v) for v in grid["pixel_spacing_mm"]],
        },
        "output": {"name": OUTPUT_NAME, "activation": "sigmoid"},
        "preprocessing_profile": profile or meta.get("preprocessing_profile", "dwi-median-adc-fixed-v1"),
        "threshold": threshold,
        **({"min_component_peak_probability": min_component_peak} if min_component_peak else {}),
        **({"test_time_augmentation": list(test_time_augmentation)} if test_time_augmentation else {}),
        "intended_use": "Research and integration testing only. Not for diagnosis.",
        "training_data": training_data or (
            f"{n_train} training and {n_val} validation studies"
            + (f" of domains {', '.join(domains)}" if domains else "")
            + f" ({meta.get('mode', 'train')}), read through service.intake.load_study and "
            "service.preprocess.to_model_input."
        ),
        "reproduce": reproduce,
        "metrics": {
            "onnx_parity_max_abs_diff": float(f"{diff:.3g}"),
            **(
                {"validation_dice_mean_model_grid": round(float(training["best_val_dice_mean"]), 4),
                 "best_epoch": int(training["best_epoch"]),
                 "training_minutes": round(float(training["seconds"]) / 60.0, 1)}
                if "best_val_dice_mean" in training else {}
            ),
            **(metrics or {}),
        },
    }
    (out_dir / "model.yaml").write_text(
        "# Model card: read by service.inference.card.load_model_card.\n"
        + yaml.safe_dump(card, sort_keys=False, width=100)
    )
    files = ["model.onnx", "model.yaml"]
    if checkpoint is not None:
        shutil.copyfile(checkpoint, out_dir / "checkpoint.pt")
        files.append("checkpoint.pt")
    sums = "".join(f"{sha256_of(out_dir / f)}  {f}\n" for f in files)
    (out_dir / "SHA256SUMS").write_text(sums)
    return out_dir
