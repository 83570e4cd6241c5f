"""Residual 2-D U-Net with bidirectional ConvLSTMs across slices (Alis et al. 2020).

The seed paper (Alis et al., "Inter-vendor performance of deep learning in
segmenting acute ischemic lesions on DWI") feeds a whole examination per
patient -- slices x (DWI, ADC) at 224x224 -- into a residual 2-D U-Net in which
"bi-directional ConvLSTM layers are implemented on top of each convolutional
block of the encoder network", so that every slice sees the others before the
lesion border is drawn.  It reports 8,228,401 trainable parameters and nothing
else about widths or depth, so the structure here is reconstructed from what
the text names and its two references (Zhang et al. 2018 residual U-Net; Shi
et al. 2015 ConvLSTM):

* encoder: 5 resolution levels with widths ``width * (1, 2, 4, 8, 16)``; each
  level is two residual units ("residual layers ... for each convolutional
  block"; Zhang's ResUNet unit: conv3x3-BN-ReLU-conv3x3 for the very first,
  BN-ReLU-conv3x3-BN-ReLU-conv3x3 afterwards, 1x1 conv + BN on the shortcut
  where the shape changes, identity otherwise); levels 2-5 downsample with
  the first conv at stride 2 as ResUNet does;
* on top of every encoder block (bridge included) a bidirectional ConvLSTM
  whose two directions each carry ``channels // 2`` hidden maps; forward and
  backward outputs are concatenated back to ``channels`` and added to the
  block output (residual, so a freshly initialised recurrence does not wash
  out the convolutional features);
* decoder: nearest 2x upsampling, concatenation with the ConvLSTM-refined
  skip, a residual block; 1x1 conv head with bias giving logits.

With ``width=16`` (the usual Keras ResUNet start width) this gives
8,367,185 parameters, 1.7 % above the paper's 8,228,401 -- close enough that
the remaining difference is a detail of their blocks we cannot see (with one
unit per encoder level it would be 6,792,881, 17 % below, which is why two
are used).  ``width=4`` is the CPU-serving variant (525,269 parameters).
:func:`expected_parameter_count` gives these numbers by formula.

Tensor layout: one patient per call, input ``(slices, 2, H, W)``, output
logits ``(slices, 1, H, W)``; the slice axis is both the convolution batch and
the ConvLSTM sequence.  H and W must be multiples of 16.

Export: the per-slice recurrence is the free function :func:`convlstm_scan`,
written so that TorchScript can compile it; :func:`script_recurrences` makes
a copy that calls the compiled version, after which the ONNX (TorchScript) exporter
emits a real ONNX ``Loop`` over the slice count instead of unrolling the loop
at the example's length (see models/export_seed.py).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ``width`` giving the paper-sized model (8,367,185 vs 8,228,401 parameters).
FULL_WIDTH = 16
#: ``width`` of the CPU-serving variant (525,269 parameters).
NARROW_WIDTH = 4
#: Trainable parameters reported by Alis et al. (2020).
PAPER_PARAMETERS = 8_228_401


@dataclass(frozen=True, slots=True)
class ResConvLSTMUNetConfig:
    """``width`` channels at full resolution, doubled at each of ``levels - 1`` downsamplings."""

    in_channels: int = 2
    out_channels: int = 1
    width: int = NARROW_WIDTH
    levels: int = 5
    encoder_units: int = 2
    lstm_kernel: int = 3

    def __post_init__(self) -> None:
        if (
            self.width < 2
            or self.width % 2
            or self.levels < 2
            or self.encoder_units < 1
            or self.lstm_kernel % 2 == 0
        ):
            raise ValueError(f"invalid config {self}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.width * 2**i for i in range(self.levels))

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this."""
        return int(2 ** (self.levels - 1))


class ResidualBlock(nn.Module):
    """ResUNet unit: two 3x3 convs with BN/ReLU plus a shortcut (1x1 conv + BN if shape changes).

    ``first`` drops the leading BN-ReLU (Zhang et al.'s input block) because
    normalising the raw two-channel input before any convolution would make
    the ADC/DWI scale information batch-dependent for no gain.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, first: bool = False) -> None:
        super().__init__()
        pre: list[nn.Module] = [] if first else [nn.BatchNorm2d(c_in), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(
            *pre,
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if c_in == c_out and stride == 1
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def convlstm_scan(gates_x: torch.Tensor, weight_h: torch.Tensor, padding: int) -> torch.Tensor:
    """Run the ConvLSTM cell over axis 0: ``gates_x`` (T, 4*hd, H, W) -> h (T, hd, H, W).

    ``gates_x`` holds the input-to-gates convolution of every step (computed
    outside, batched over slices, because it does not depend on the previous
    step); ``weight_h`` is the hidden-to-gates kernel (4*hd, hd, k, k).  Gate
    order i, f, g, o as in Keras ConvLSTM2D.  A free function over tensors
    with explicit slicing rather than ``chunk`` so that TorchScript can
    compile it (:func:`_scripted_scan`) and the ONNX exporter emits a ``Loop``.
    """
    hd = weight_h.shape[1]
    h = gates_x.new_zeros((1, hd, gates_x.shape[2], gates_x.shape[3]))
    c = h
    outputs: list[torch.Tensor] = []
    for t in range(gates_x.shape[0]):
        g = gates_x[t : t + 1] + F.conv2d(h, weight_h, None, 1, padding)
        i = torch.sigmoid(g[:, 0:hd])
        f = torch.sigmoid(g[:, hd : 2 * hd])
        cand = torch.tanh(g[:, 2 * hd : 3 * hd])
        o = torch.sigmoid(g[:, 3 * hd : 4 * hd])
        c = f * c + i * cand
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.cat(outputs, dim=0)


@functools.cache
def _scripted_scan() -> torch.jit.ScriptFunction:
    """:func:`convlstm_scan` compiled once, on first export (scripting costs ~1 s)."""
    return torch.jit.script(convlstm_scan)


class ConvLSTMRecurrence(nn.Module):
    """The sequential half of a ConvLSTM direction: hidden-to-gates conv and the cell update.

    ``scripted`` switches to the TorchScript-compiled loop; set it only for
    ONNX export (:func:`script_recurrences`).  A scripted *function* called
    while tracing is inlined with its loop intact, whereas a scripted
    submodule inside a traced module is rejected by the ONNX tracer in
    torch 2.13 ("not part of the active trace").
    """

    def __init__(self, hidden: int, kernel: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.scripted = False
        self.conv_h = nn.Conv2d(hidden, 4 * hidden, kernel, padding=kernel // 2, bias=False)

    def forward(self, gates_x: torch.Tensor) -> torch.Tensor:
        """``gates_x`` (T, 4*hidden, H, W) -> hidden states (T, hidden, H, W), in order."""
        scan = _scripted_scan() if self.scripted else convlstm_scan
        return scan(gates_x, self.conv_h.weight, self.conv_h.kernel_size[0] // 2)


class ConvLSTMDirection(nn.Module):
    """One direction of a ConvLSTM (Shi et al. 2015, no peepholes, as in Keras ConvLSTM2D)."""

    def __init__(self, c_in: int, hidden: int, kernel: int, *, reverse: bool) -> None:
        super().__init__()
        self.reverse = reverse
        self.conv_x = nn.Conv2d(c_in, 4 * hidden, kernel, padding=kernel // 2)
        self.recurrence = ConvLSTMRecurrence(hidden, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates_x = self.conv_x(x)
        if self.reverse:
            return torch.flip(self.recurrence(torch.flip(gates_x, [0])), [0])
        return self.recurrence(gates_x)


class BiConvLSTM(nn.Module):
    """Forward and backward ConvLSTM over the slice axis, concatenated, added to the input."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.forward_dir = ConvLSTMDirection(channels, hidden, kernel, reverse=False)
        self.backward_dir = ConvLSTMDirection(channels, hidden, kernel, reverse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.cat([self.forward_dir(x), self.backward_dir(x)], dim=1)


class ResConvLSTMUNet(nn.Module):
    """Alis et al. residual ConvLSTM U-Net; returns logits, not probabilities."""

    def __init__(self, config: ResConvLSTMUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ResConvLSTMUNetConfig()
        widths = self.config.widths
        k = self.config.lstm_kernel
        self.encoders = nn.ModuleList()
        self.recurrents = nn.ModuleList()
        c_in = self.config.in_channels
        for level, w in enumerate(widths):
            stride = 1 if level == 0 else 2
            units: list[nn.Module] = [ResidualBlock(c_in, w, stride=stride, first=level == 0)]
            units += [ResidualBlock(w, w) for _ in range(self.config.encoder_units - 1)]
            self.encoders.append(nn.Sequential(*units))
            self.recurrents.append(BiConvLSTM(w, k))
            c_in = w
        self.decoders = nn.ModuleList(
            ResidualBlock(c_in_up + w_skip, w_skip)
            for c_in_up, w_skip in zip(
                reversed(widths[1:]), reversed(widths[:-1]), strict=True
            )
        )
        self.head = nn.Conv2d(widths[0], self.config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (slices, in_channels, H, W) of one patient -> logits (slices, out_channels, H, W)."""
        skips: list[torch.Tensor] = []
        for encoder, recurrent in zip(self.encoders, self.recurrents, strict=True):
            x = recurrent(encoder(x))
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"),
                                   skips.pop()], dim=1))
        return self.head(x)


def script_recurrences(net: ResConvLSTMUNet) -> ResConvLSTMUNet:
    """A copy of ``net`` whose slice loops are TorchScript-compiled, for ONNX export.

    Tracing alone would record the loop unrolled at the example's slice count
    (pytorch #122588); a scripted function called inside a traced module is
    exported as an ONNX ``Loop`` whose trip count is the runtime slice count.
    """
    scripted = copy.deepcopy(net).eval()
    for recurrent in scripted.recurrents:
        assert isinstance(recurrent, BiConvLSTM)
        for direction in (recurrent.forward_dir, recurrent.backward_dir):
            direction.recurrence.scripted = True
    return scripted


def expected_parameter_count(config: ResConvLSTMUNetConfig) -> int:
    """Trainable parameters of ``ResConvLSTMUNet(config)`` by formula, without building it.

    Lets tests and the model card check the paper-sized model cheaply; a test
    checks the formula against an instantiated narrow model.
    """

    def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
        return c_in * c_out * k * k + (c_out if bias else 0)

    def bn(c: int) -> int:
        return 2 * c

    def block(c_in: int, c_out: int, first: bool = False, stride: int = 1) -> int:
        pre = 0 if first else bn(c_in)
        body = pre + conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3)
        identity = c_in == c_out and stride == 1
        return body + (0 if identity else conv(c_in, c_out, 1) + bn(c_out))

    def bilstm(c: int, k: int) -> int:
        h = c // 2
        return 2 * (conv(c, 4 * h, k) + conv(h, 4 * h, k, bias=False))

    widths = config.widths
    total = 0
    c_in = config.in_channels
    for level, w in enumerate(widths):
        total += block(c_in, w, level == 0, 1 if level == 0 else 2)
        total += (config.encoder_units - 1) * block(w, w)
        total += bilstm(w, config.lstm_kernel)
        c_in = w
    for c_up, w_skip in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
        total += block(c_up + w_skip, w_skip)
    return total + conv(widths[0], config.out_channels, 1)
