"""The GEMM kernel choice and the linear layer built on it agree with torch's own products."""

import torch
from torch import nn

from moekit.kernels.gemm import linear, linear_into, onednn_is_faster
from moekit.kernels.linear import Linear, fast_linear


def test_linear_matches_mm_for_every_layout():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=gen)
    w = torch.randn(16, 24, generator=gen)
    expected = x @ w.t()
    for xs in (x, x.t().contiguous().t()):
        for ws in (w, w.t().contiguous().t()):
            torch.testing.assert_close(linear(xs, ws), expected, rtol=1e-5, atol=1e-5)
    out = torch.empty(40, 16)
    linear_into(out[2:39], x, w)
    torch.testing.assert_close(out[2:39], expected, rtol=1e-5, atol=1e-5)
    assert linear(x[:0], w).shape == (0, 16)


def test_float64_uses_torch_mm_exactly():
    assert not onednn_is_faster(torch.float64)
    x, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert torch.equal(linear(x, w), torch.mm(x, w.t()))


def test_fast_linear_forward_and_gradients_match_f_linear():
    layer = Linear(12, 9, bias=True)
    reference = nn.Linear(12, 9, bias=True)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 5, 9)
    (layer(x) * upstream).sum().backward()
    (reference(x_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)
    # a sum's zero-stride gradient is accepted
    fast_linear(x, layer.weight).sum().backward()
