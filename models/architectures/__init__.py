"""Network architectures (PyTorch); exported to ONNX for serving."""

from models.architectures.preact_unet3d import PreActUNet3D, PreActUNet3DConfig, SliceStack3D
from models.architectures.res_convlstm_unet import ResConvLSTMUNet, ResConvLSTMUNetConfig
from models.architectures.unet2d import UNet2D, UNet2DConfig

__all__ = [
    "PreActUNet3D",
    "PreActUNet3DConfig",
    "ResConvLSTMUNet",
    "ResConvLSTMUNetConfig",
    "SliceStack3D",
    "UNet2D",
    "UNet2DConfig",
]
