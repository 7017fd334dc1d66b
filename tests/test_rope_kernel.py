"""RoPE's rotation on moekit's kernel (`kernels.rope`): torch's values and gradients bit for bit,
for both conventions of the sine, any query layout a model makes, and the models that train and
generate through it (moekit's LM and every imported family with the half-split layout)."""

from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    autograd_node_names,
    kernel_against_torch_gradients,
    needs_loops,
    training_lm,
)
from moekit.kernels import rope
from moekit.kernels.native import same_bits, same_layout

# the kernels built for the CPU's other vector set repeat torch's bits too (`make test`'s third leg)
pytestmark = pytest.mark.other_vector_set
KERNEL_NODE = "_HalfRotationBackward"


@needs_loops
@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 6),
    steps=st.integers(1, 40),
    half=st.integers(1, 40),
    layout=st.sampled_from(rope.QUERY_LAYOUTS),
    signed_sin=st.booleans(),
    shared_tables=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_rotates_and_differentiates_as_torchs_ops(
    batch, heads, steps, half, layout, signed_sin, shared_tables, seed
):
    """Forward and backward give torch's ops' values bit for bit (each product rounded before the
    sum; -0 where torch's sum gives -0), in torch's layout, and float64's values to rounding."""
    gen = torch.Generator().manual_seed(seed)
    x = rope.queries(gen, batch, heads, steps, 2 * half, layout) * 3
    x[..., ::3] = 0.0
    tables = 1 if shared_tables else batch
    cos = torch.randn(tables, 1, steps, 2 * half, generator=gen)
    sin = torch.randn(tables, 1, steps, 2 * half, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    grad[:, :, 0] = -0.0  # both halves: a -0 sum, which transformers' slices turn to +0
    ours, theirs = x.detach().requires_grad_(), x.detach().requires_grad_()
    arriving = []  # the gradients as they arrive: their layout decides the order of later sums
    for leaf in (ours, theirs):
        leaf.register_hook(arriving.append)

    y = rope.rotate_half(ours, cos, sin, signed_sin)
    expected = rope.torch_rotation(theirs, cos, sin, signed_sin)
    assert KERNEL_NODE in autograd_node_names(y)
    assert same_bits(y, expected)
    assert same_layout(y, expected)
    y.backward(grad)
    expected.backward(grad)
    assert same_bits(ours.grad, theirs.grad)
    assert same_layout(*arriving)
    with torch.no_grad():  # a prompt's prefill
        assert same_bits(rope.rotate_half(x, cos, sin, signed_sin), expected)
    with torch.inference_mode():  # a decoding step
        assert same_bits(rope.rotate_half(x, cos, sin, signed_sin), expected)

    sign = torch.ones(2 * half, dtype=torch.float64)
    if not signed_sin:
        sign[:half] = -1.0
    exact = x.double() * cos.double() + torch.roll(x.double(), half, dims=-1) * sin.double() * sign
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


@needs_loops
@pytest.mark.parametrize("signed_sin", [True, False])
def test_gradients_of_minus_zero_keep_torchs_sign(signed_sin):
    """dL/dy = -0 everywhere with positive tables: torch's sum is -0 through the roll (signed sine)
    and +0 through transformers' slices, whose zero-filled gradients join the sum; so is the
    kernel's."""
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = torch.rand(1, 1, 3, 8) + 0.1, torch.rand(1, 1, 3, 8) + 0.1
    rope.rotate_half(x, cos, sin, signed_sin).backward(torch.full(x.shape, -0.0))
    assert torch.equal(torch.signbit(x.grad), torch.full(x.shape, signed_sin))


@needs_loops
def test_the_two_conventions_of_the_sine_rotate_alike():
    """transformers' x * cos + cat(-x2, x1) * sin (moekit's LM) and the swap with the sine's first
    half negated (imported models' `head_tables`) are one rotation: the same bits on the kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen)
    cos, sin = torch.randn(2, 1, 5, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    signed = torch.cat([-sin[..., :4], sin[..., 4:]], dim=-1)
    plain = rope.rotate_half(x, cos, sin, signed_sin=False)
    assert same_bits(plain, rope.rotate_half(x, cos, signed, signed_sin=True))
    assert not torch.equal(plain, rope.rotate_half(x, cos, sin, signed_sin=True))  # the sign matters


def test_what_the_kernel_does_not_take_runs_on_torchs_ops():
    """float64, tables that need a gradient, odd widths and `MOEKIT_NATIVE=0` (the probe failing)
    rotate on torch's ops, with the same values as the kernel would give."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 6, generator=gen, requires_grad=True)
    cos, sin = torch.randn(1, 1, 3, 6, generator=gen), torch.randn(1, 1, 3, 6, generator=gen)
    cases = [
        (x.double(), cos.double(), sin.double()),
        (x, cos.requires_grad_(), sin),
        (torch.randn(1, 2, 3, 5, requires_grad=True), torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5)),
    ]
    for xs, c, s in cases:
        y = rope.rotate_half(xs, c, s, signed_sin=False)
        assert KERNEL_NODE not in autograd_node_names(y)
        torch.testing.assert_close(y, rope.torch_rotation(xs, c, s, signed_sin=False), rtol=0, atol=0)
    cos.requires_grad_(False)
    with patch.object(rope, "matches_torch", return_value=False):
        assert KERNEL_NODE not in autograd_node_names(rope.rotate_half(x, cos, sin))


@needs_loops
def test_moekits_lm_trains_through_the_kernel_in_torchs_bits():
    """An fp32 MoE LM's queries and keys rotate on the kernel in training, and every parameter's
    gradient is the one torch's ops give, bit for bit."""
    model = training_lm()
    ids = torch.randint(0, 64, (3, 24))
    names, torch_names, differing = kernel_against_torch_gradients(model, ids, rope, "matches_torch")
    assert KERNEL_NODE in names and KERNEL_NODE not in torch_names
    assert not differing


@needs_loops
def test_imported_families_train_through_the_kernel_in_torchs_bits(tmp_path):
    """Every imported family whose queries rotate in the half-split layout differentiates through
    the kernel, with torch's gradients bit for bit."""
    pytest.importorskip(
        "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
    )
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import TINY_CONFIGS, tiny_model

    rotated, half_split = [], []
    for family in TINY_CONFIGS:
        folder = tmp_path / family
        tiny_model(family, seed=4).save_pretrained(folder)
        model = from_hf(folder).train()
        if model.config.rope.layout == "half":
            half_split.append(family)
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
        names, _, differing = kernel_against_torch_gradients(model, ids, rope, "matches_torch")
        assert not differing, family
        if KERNEL_NODE in names:
            rotated.append(family)
    assert len(half_split) >= 5 and rotated == half_split
