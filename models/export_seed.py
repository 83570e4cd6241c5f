"""ONNX export of the seed-paper networks with a dynamic slice count, plus parity check.

    python -m models.export_seed --arch res-convlstm --width 4 --out runs/rcl.onnx
    python -m models.export_seed --arch preact3d --width 8 --checkpoint ckpt.pt --out p3.onnx

Both graphs follow the contract of :mod:`models.export` so the service can
load them like the bundled 2-D U-Net: input ``image`` (slices, 2, H, W)
float32, output ``probability`` (slices, 1, H, W) with the sigmoid inside,
dynamic axis 0, opset :data:`models.export.OPSET`.

How the slice count stays dynamic (torch 2.13; the dynamo exporter needs
onnxscript, which this project does not install, so the TorchScript exporter
is used, as in :mod:`models.export`):

* residual ConvLSTM U-Net: plain tracing would unroll the ConvLSTM loop at
  the example's slice count (pytorch #122588) and the graph would silently
  compute garbage -- or fail -- at any other count.  The recurrence is a
  TorchScript-compiled function (:func:`~models.architectures.res_convlstm_unet.script_recurrences`),
  which the tracer inlines as an ONNX ``Loop`` whose trip count is the
  runtime slice count.  :func:`export_seed_onnx` refuses a graph without a
  ``Loop`` node.
* 3-D pre-activation U-Net: no loop; the stack is presented as one volume by
  :class:`~models.architectures.preact_unet3d.SliceStack3D` and the model pads
  D/H/W to its pooling multiple from the traced shape, so any slice count
  works.

Parity is always checked at two or more slice counts that differ from the
export example (:data:`SEED_PARITY_SLICE_COUNTS`), because a frozen loop
passes a check at the example's own length.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from models.architectures.preact_unet3d import PreActUNet3D
from models.architectures.registry import build_network, stack_logits, width_config
from models.architectures.res_convlstm_unet import (
    NARROW_WIDTH,
    ResConvLSTMUNet,
    script_recurrences,
)
from models.architectures.unet2d import SigmoidHead, count_parameters
from models.export import OPSET, PARITY_TOLERANCE, check_parity, write_onnx

logger = logging.getLogger(__name__)

ARCHITECTURES = ("res-convlstm", "preact3d")
#: Slice counts for parity; neither equals the export example's count (3).
SEED_PARITY_SLICE_COUNTS = (7, 19)
_EXAMPLE_SLICES = 3


def slice_stack_logits(net: nn.Module) -> nn.Module:
    """``net`` as a (slices, 2, H, W) -> (slices, 1, H, W) logit module, eager (the reference)."""
    if not isinstance(net, PreActUNet3D | ResConvLSTMUNet):
        raise TypeError(f"not a seed architecture: {type(net).__name__}")
    return stack_logits(net).eval()


def _exportable(net: nn.Module) -> nn.Module:
    """The module actually traced: loops scripted, layout adapted, sigmoid appended."""
    if isinstance(net, ResConvLSTMUNet):
        return SigmoidHead(script_recurrences(net)).eval()
    return SigmoidHead(slice_stack_logits(net)).eval()


def export_seed_onnx(
    net: nn.Module, path: Path, *, matrix: tuple[int, int] = (224, 224), opset: int = OPSET
) -> None:
    """Write ``net`` (a seed architecture, logits) as an ONNX graph returning probabilities."""
    write_onnx(
        _exportable(net),
        path,
        matrix=matrix,
        opset=opset,
        example_slices=_EXAMPLE_SLICES,
        required_op="Loop" if isinstance(net, ResConvLSTMUNet) else None,
    )


def export_and_verify(
    net: nn.Module,
    path: Path,
    *,
    matrix: tuple[int, int] = (224, 224),
    slice_counts: tuple[int, ...] = SEED_PARITY_SLICE_COUNTS,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Export, then compare ONNX Runtime with PyTorch; deletes the file and raises on failure."""
    export_seed_onnx(net, path, matrix=matrix)
    diff = check_parity(slice_stack_logits(net), path, matrix=matrix, slice_counts=slice_counts)
    if diff > tolerance:
        path.unlink()
        raise RuntimeError(f"ONNX/PyTorch parity failed at slices {slice_counts}: {diff:.2e}")
    logger.info("ONNX parity at slices %s: max abs diff %.2e", slice_counts, diff)
    return diff


def build(arch: str, width: int) -> nn.Module:
    """A fresh network of ``arch``; ``width`` is the first-level channel count."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return build_network(arch, width_config(arch, width))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a seed architecture to ONNX")
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True)
    parser.add_argument("--width", type=int, default=NARROW_WIDTH)
    parser.add_argument(
        "--checkpoint", type=Path, help="torch file with 'state_dict' (default: random init)"
    )
    parser.add_argument("--matrix", type=int, nargs=2, default=(224, 224))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    net = build(args.arch, args.width)
    if args.checkpoint:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(checkpoint["state_dict"])
    diff = export_and_verify(net.eval(), args.out, matrix=tuple(args.matrix))
    print(
        f"wrote {args.out}: {args.arch} width {args.width}, {count_parameters(net)} parameters, "
        f"opset {OPSET}, parity max abs diff {diff:.2e} at slices {SEED_PARITY_SLICE_COUNTS}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
