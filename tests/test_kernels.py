"""The GEMM kernel choice and the linear layer built on it agree with torch's own products."""

import pytest
import torch
from torch import nn

from moekit.kernels.gemm import ONEDNN_MIN_MACS, dense_onednn_pays_off, linear, onednn_is_faster
from moekit.kernels.linear import Linear, fast_linear

pytestmark = pytest.mark.portable


def test_linear_matches_mm_for_every_layout():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 128, generator=gen)  # large enough for oneDNN where it is faster
    w = torch.randn(192, 128, generator=gen)
    assert dense_onednn_pays_off(200, 128, 192, x.dtype) == onednn_is_faster(x.dtype)
    expected = x @ w.t()
    for xs in (x, x.t().contiguous().t()):
        for ws in (w, w.t().contiguous().t()):
            torch.testing.assert_close(linear(xs, ws), expected, rtol=1e-5, atol=1e-5)
    assert linear(x[:0], w).shape == (0, 192)


def test_small_dense_products_stay_on_torch_mm():
    """oneDNN's fixed cost per call loses below ONEDNN_MIN_MACS (decode, routers): those products
    are torch's own, to the bit, and so are their gradients."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 256, generator=gen, requires_grad=True)
    w = torch.randn(128, 256, generator=gen, requires_grad=True)
    assert not dense_onednn_pays_off(8, 256, 128, x.dtype) and ONEDNN_MIN_MACS > 8 * 256 * 128
    assert torch.equal(linear(x.detach(), w.detach()), torch.mm(x.detach(), w.detach().t()))
    upstream = torch.randn(8, 128, generator=gen)
    fast_linear(x, w).backward(upstream)
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    nn.functional.linear(x, w).backward(upstream)
    assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], w.grad)


def test_float64_uses_torch_mm_exactly():
    assert not onednn_is_faster(torch.float64)
    x, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert torch.equal(linear(x, w), torch.mm(x, w.t()))


def test_fast_linear_forward_and_gradients_match_f_linear():
    layer = Linear(256, 320, bias=True)  # 128 rows: every product large enough for oneDNN
    reference = nn.Linear(256, 320, bias=True)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 64, 320)
    (layer(x) * upstream).sum().backward()
    (reference(x_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)
    # a sum's zero-stride gradient is accepted
    fast_linear(x, layer.weight).sum().backward()
