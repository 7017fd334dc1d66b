"""The GEMM kernel choice and the linear layer built on it agree with torch's own products."""

import pytest
import torch
from torch import nn

from moekit.kernels.gemm import (
    CHUNK_ROWS,
    ONEDNN_MIN_MACS,
    ROW_BUCKET,
    dense_onednn_pays_off,
    linear,
    linear_parts,
    linear_rows,
    onednn_is_faster,
    padded_stop,
    row_chunks,
    weight_grad,
)
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


def test_row_varying_products_are_cut_into_few_shapes_and_add_up():
    """Expert products go to oneDNN in CHUNK_ROWS chunks plus a bucketed tail (few distinct
    shapes to compile), the last rows to MKL; the blocks and the summed weight gradient are exact."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=gen)
    for rows in (0, 3, 8, 13, CHUNK_ROWS, CHUNK_ROWS + 21, 2 * CHUNK_ROWS + 8):
        x = torch.randn(rows, 24, generator=gen)
        g = torch.randn(rows, 16, generator=gen)
        chunks, rest = row_chunks(rows, torch.float32)
        covered = [r for start, stop in chunks for r in range(start, stop)]
        assert covered == list(range(rest))
        if onednn_is_faster(torch.float32):  # on machines where MKL wins, everything goes to MKL
            assert rows - rest < max(ROW_BUCKET, 8)
            assert all(
                stop - start == CHUNK_ROWS or (stop - start) % ROW_BUCKET == 0 for start, stop in chunks
            )
        else:
            assert chunks == [] and rest == 0
        parts = linear_parts(x, w)
        joined = torch.cat(parts) if parts else x.new_empty(0, 16)
        torch.testing.assert_close(joined, x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weight_grad(g, x), g.t() @ x, rtol=1e-4, atol=1e-4)


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


def test_rows_of_a_buffer_round_up_over_the_next_rows_and_drop_them():
    gen = torch.Generator().manual_seed(2)
    buffer = torch.randn(3 * CHUNK_ROWS, 24, generator=gen)
    w = torch.randn(16, 24, generator=gen)
    for start, stop in [(0, 13), (5, 5 + CHUNK_ROWS + 19), (len(buffer) - 13, len(buffer)), (7, 9), (0, 0)]:
        parts = linear_rows(buffer, start, stop, w)
        joined = torch.cat(parts) if parts else buffer.new_empty(0, 16)
        torch.testing.assert_close(joined, buffer[start:stop] @ w.t(), rtol=1e-5, atol=1e-5)
    if onednn_is_faster(torch.float32):  # the tail rounds up only where the buffer has the rows
        assert padded_stop(0, 13, len(buffer), torch.float32) == ROW_BUCKET
        assert padded_stop(5, 5 + CHUNK_ROWS + 19, len(buffer), torch.float32) == 5 + CHUNK_ROWS + 32
        assert padded_stop(len(buffer) - 13, len(buffer), len(buffer), torch.float32) == len(buffer)
        assert padded_stop(7, 9, len(buffer), torch.float32) == 9
