"""Network architectures (PyTorch); exported to ONNX for serving."""

from models.architectures.unet2d import UNet2D, UNet2DConfig

__all__ = ["UNet2D", "UNet2DConfig"]
