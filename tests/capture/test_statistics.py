"""Layer statistics (capture/statistics.py) against the dense im2col rows of capture/hooks.py, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.capture import hooks as C
from secondorder.capture import statistics as S

F64 = torch.float64


def _conv(bias, stride, padding, dilation):
    torch.manual_seed(0)
    return nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).double()


GEOMETRIES = [(1, 0, 1), (2, 1, 1), (1, 2, 2), (1, "same", 1)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,padding,dilation", GEOMETRIES)
def test_conv_statistics_equal_dense_im2col(bias, stride, padding, dilation):
    conv = _conv(bias, stride, padding, dilation)
    a = torch.randn(4, 2, 7, 6, dtype=F64)
    h = conv(a).detach()
    rows = C.input_rows(conv, a)  # (m |T|, D) with the 1 when the layer has a bias
    gram = rows.t() @ rows / a.shape[0]  # A = (1/m) sum_{n,t} abar abar^T
    v = torch.randn(rows.shape[1], dtype=F64)
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.input_action(conv, a, v), gram @ v, **tight)
    torch.testing.assert_close(S.input_gram(conv, a), gram, **tight)
    torch.testing.assert_close(S.input_gram(conv, a, chunk_elements=1), gram, **tight)
    torch.testing.assert_close(S.input_mean(conv, a, tuple(h.shape[2:])), rows.mean(0), **tight)
    torch.testing.assert_close(S.spatial_mean(conv, h), C.output_rows(conv, h).mean(0), **tight)
    torch.testing.assert_close(S.spatial_abs_mean(conv, h), C.output_rows(conv, h).abs().mean(0), **tight)
    channels_last = h.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(S.spatial_abs_mean(conv, channels_last), S.spatial_abs_mean(conv, h), **tight)
    assert S.conv_kwargs(conv)["padding"] == C.conv_padding(conv)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_statistics_count_extra_dimensions_as_locations(bias):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=bias).double()
    a = torch.randn(4, 5, 3, dtype=F64)  # 5 locations (a sequence) per example
    h = lin(a).detach()
    rows = C.input_rows(lin, a)
    assert rows.shape == (20, 4 if bias else 3)
    gram = rows.t() @ rows / 4  # the sum over locations, the mean over examples
    v = torch.randn(rows.shape[1], dtype=F64)
    torch.testing.assert_close(S.input_action(lin, a, v), gram @ v)
    torch.testing.assert_close(S.input_gram(lin, a), gram)
    torch.testing.assert_close(S.input_mean(lin, a, ()), rows.mean(0))
    torch.testing.assert_close(S.spatial_mean(lin, h), h.reshape(-1, 2).mean(0))
    torch.testing.assert_close(S.spatial_abs_mean(lin, h), h.reshape(-1, 2).abs().mean(0))
    plain = torch.randn(6, 3, dtype=F64)
    torch.testing.assert_close(S.spatial_mean(lin, lin(plain).detach()), lin(plain).detach().mean(0))
