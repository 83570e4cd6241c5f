"""The seed papers' networks: shapes, parameter counts, gradients, ONNX parity.

Fast by design (narrow widths, 32-64 px matrices): the full-width Alis model
is only instantiated, never run.  Parity is checked at slice counts (7, 19)
different from the export example (3), which is what catches a ConvLSTM loop
frozen at export time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from models.architectures.preact_unet3d import PreActUNet3D, PreActUNet3DConfig, SliceStack3D
from models.architectures.res_convlstm_unet import (
    FULL_WIDTH,
    NARROW_WIDTH,
    PAPER_PARAMETERS,
    ResConvLSTMUNet,
    ResConvLSTMUNetConfig,
    expected_parameter_count,
    script_recurrences,
)
from models.architectures.unet2d import count_parameters
from models.export import PARITY_TOLERANCE
from models.export_seed import SEED_PARITY_SLICE_COUNTS, export_and_verify
from models.training.losses import tversky_loss


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These graphs are many tiny convolutions: on 2 shared cores one intra-op thread is
    several times faster than two fighting other jobs, and keeps the module under ~30 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _narrow_alis() -> ResConvLSTMUNet:
    torch.manual_seed(0)
    return ResConvLSTMUNet(ResConvLSTMUNetConfig(width=NARROW_WIDTH))


def _narrow_noh() -> PreActUNet3D:
    torch.manual_seed(0)
    return PreActUNet3D(PreActUNet3DConfig(base_width=4))


def _randomise_batchnorm(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so parity also covers BatchNorm in eval mode."""
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return net.eval()


# -- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("slices", [1, 5])
def test_alis_output_shape(slices: int) -> None:
    net = _narrow_alis().eval()
    with torch.no_grad():
        out = net(torch.randn(slices, 2, 64, 48))
    assert out.shape == (slices, 1, 64, 48)
    assert torch.isfinite(out).all()


def test_alis_convlstm_is_bidirectional_across_slices() -> None:
    """Changing the first slice changes the last slice's output and vice versa."""
    net = _narrow_alis().eval()
    x = torch.randn(6, 2, 32, 32)
    with torch.no_grad():
        base = net(x)
        first = x.clone()
        first[0] += 1.0
        last = x.clone()
        last[-1] += 1.0
        assert (net(first)[-1] - base[-1]).abs().max() > 1e-6  # forward direction
        assert (net(last)[0] - base[0]).abs().max() > 1e-6  # backward direction


def test_alis_scripted_recurrence_matches_eager() -> None:
    net = _randomise_batchnorm(_narrow_alis())
    x = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(script_recurrences(net)(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("depth", "rows", "cols"), [(7, 40, 44), (8, 32, 32), (1, 24, 24)])
def test_noh_output_shape_any_size(depth: int, rows: int, cols: int) -> None:
    """D, H, W need not be pooling multiples: the model pads and crops internally."""
    net = _narrow_noh().eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, depth, rows, cols))
    assert out.shape == (2, 1, depth, rows, cols)
    with torch.no_grad():
        stacked = SliceStack3D(net)(torch.randn(depth, 2, rows, cols))
    assert stacked.shape == (depth, 1, rows, cols)


def test_noh_pools_thick_slices_in_plane_first() -> None:
    config = PreActUNet3DConfig()
    assert config.pools[0] == (1, 2, 2)
    assert config.divisor == (4, 8, 8)
    units = [m for m in PreActUNet3D(config).modules() if isinstance(m, nn.Sequential)]
    # pre-activation: BatchNorm -> ReLU -> Conv3d
    unit = next(m for m in units if len(m) == 3 and isinstance(m[2], nn.Conv3d))
    assert isinstance(unit[0], nn.BatchNorm3d) and isinstance(unit[1], nn.ReLU)


# -- parameter counts ---------------------------------------------------------------------


def test_alis_full_width_parameter_count_near_paper() -> None:
    config = ResConvLSTMUNetConfig(width=FULL_WIDTH)
    expected = expected_parameter_count(config)
    assert abs(expected - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05
    assert expected == 8_367_185
    # building (not running) the full model is cheap and confirms the formula
    assert count_parameters(ResConvLSTMUNet(config)) == expected


@pytest.mark.parametrize("config", [
    ResConvLSTMUNetConfig(width=NARROW_WIDTH),
    ResConvLSTMUNetConfig(width=6, levels=4, encoder_units=1, lstm_kernel=5),
])
def test_alis_parameter_formula_matches_model(config: ResConvLSTMUNetConfig) -> None:
    assert count_parameters(ResConvLSTMUNet(config)) == expected_parameter_count(config)


def test_narrow_variants_are_cpu_sized() -> None:
    assert count_parameters(_narrow_alis()) == 525_269
    assert count_parameters(PreActUNet3D(PreActUNet3DConfig(base_width=8))) == 352_257
    assert count_parameters(PreActUNet3D(PreActUNet3DConfig(base_width=16))) == 1_406_593


# -- gradients ----------------------------------------------------------------------------


def _one_step_reduces_tversky(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    net.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = tversky_loss(net(x), target)
    optimiser.zero_grad()
    loss.backward()
    without_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not without_grad, f"no gradient reaches {without_grad}"
    optimiser.step()
    with torch.no_grad():
        after = tversky_loss(net(x), target)
    assert after < loss.detach()


def test_alis_backward_step_reduces_tversky() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 2, 32, 32)
    target = torch.zeros(4, 1, 32, 32)
    target[1:3, :, 10:20, 12:22] = 1.0
    _one_step_reduces_tversky(_narrow_alis(), x, target)


def test_noh_backward_step_reduces_tversky() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 2, 6, 32, 32)
    target = torch.zeros(1, 1, 6, 32, 32)
    target[:, :, 2:5, 10:20, 12:22] = 1.0
    _one_step_reduces_tversky(_narrow_noh(), x, target)


# -- ONNX export --------------------------------------------------------------------------


def test_alis_onnx_parity_dynamic_slices(tmp_path: Path) -> None:
    path = tmp_path / "alis.onnx"
    diff = export_and_verify(
        _randomise_batchnorm(_narrow_alis()), path, matrix=(64, 64),
        slice_counts=SEED_PARITY_SLICE_COUNTS,
    )
    assert diff <= PARITY_TOLERANCE
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "Loop" for node in graph.node) >= 2  # both directions, not unrolled
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "slices"


def test_noh_onnx_parity_dynamic_slices(tmp_path: Path) -> None:
    path = tmp_path / "noh.onnx"
    diff = export_and_verify(
        _randomise_batchnorm(_narrow_noh()), path, matrix=(40, 40),
        slice_counts=SEED_PARITY_SLICE_COUNTS,
    )
    assert diff <= PARITY_TOLERANCE
