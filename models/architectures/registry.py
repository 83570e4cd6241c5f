"""The architectures by name: build one from a JSON-able config, and describe it.

Checkpoints store ``architecture`` + ``config`` (what :func:`network_config`
returns), so training, fine-tuning and export rebuild exactly the network
that was trained, whatever its family:

================  ========================================  ==================
name              network                                   sees per forward
================  ========================================  ==================
``unet2d``        :class:`UNet2D` (bundled CPU model)       independent slices
``res-convlstm``  :class:`ResConvLSTMUNet` (Alis 2020)      a stack of slices
``preact3d``      :class:`PreActUNet3D` (Noh 2023)          a stack as 3-D
================  ========================================  ==================

Every network is served the same way: (slices, 2, H, W) -> (slices, 1, H, W)
logits (:func:`stack_logits`), so the service needs no special case.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from models.architectures.preact_unet3d import PreActUNet3D, PreActUNet3DConfig, SliceStack3D
from models.architectures.res_convlstm_unet import ResConvLSTMUNet, ResConvLSTMUNetConfig
from models.architectures.unet2d import UNet2D, UNet2DConfig, count_parameters

ARCHITECTURES = ("unet2d", "res-convlstm", "preact3d")
#: Architectures whose forward pass mixes neighbouring slices.
SEQUENCE_ARCHITECTURES = frozenset({"res-convlstm", "preact3d"})


def build_network(architecture: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised network of ``architecture`` with ``config`` overrides."""
    config = dict(config or {})
    if architecture == "unet2d":
        if "widths" in config:
            config["widths"] = tuple(int(w) for w in config["widths"])
        return UNet2D(UNet2DConfig(**config))
    if architecture == "res-convlstm":
        return ResConvLSTMUNet(ResConvLSTMUNetConfig(**config))
    if architecture == "preact3d":
        if "pools" in config:
            config["pools"] = tuple(tuple(int(v) for v in p) for p in config["pools"])
        return PreActUNet3D(PreActUNet3DConfig(**config))
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def architecture_of(net: nn.Module) -> str:
    if isinstance(net, UNet2D):
        return "unet2d"
    if isinstance(net, ResConvLSTMUNet):
        return "res-convlstm"
    if isinstance(net, PreActUNet3D):
        return "preact3d"
    raise TypeError(f"not a strokeseg architecture: {type(net).__name__}")


def network_config(net: nn.Module) -> dict[str, Any]:
    """The JSON-able config that :func:`build_network` turns back into ``net``'s shape."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no config")
    record = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}


def width_config(architecture: str, width: int) -> dict[str, Any]:
    """The config for a network whose first level has ``width`` channels."""
    if architecture == "unet2d":
        return {"widths": [width, 2 * width, 4 * width, 8 * width, 12 * width]}
    if architecture == "res-convlstm":
        return {"width": width}
    if architecture == "preact3d":
        return {"base_width": width}
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def stack_logits(net: nn.Module) -> nn.Module:
    """``net`` as a (slices, 2, H, W) -> (slices, 1, H, W) logit module (train or eval)."""
    if isinstance(net, PreActUNet3D):
        return SliceStack3D(net)
    return net


def describe(net: nn.Module) -> str:
    """One line for a model card: family, shape and parameter count."""
    arch = architecture_of(net)
    n = count_parameters(net)
    if isinstance(net, UNet2D):
        return (
            f"UNet2D widths {list(net.config.widths)}, 2x(conv3x3-BN-ReLU) per level, "
            f"max-pool down, transposed-conv up, {n} parameters"
        )
    if isinstance(net, ResConvLSTMUNet):
        return (
            f"Residual U-Net with bidirectional ConvLSTM across slices at every encoder level "
            f"(Alis 2020), widths {list(net.config.widths)}, {n} parameters"
        )
    if isinstance(net, PreActUNet3D):
        return (
            f"3-D U-Net of pre-activation units BN-ReLU-Conv3D (Noh 2023), widths "
            f"{list(net.config.widths)}, {n} parameters"
        )
    return f"{arch}, {n} parameters"
