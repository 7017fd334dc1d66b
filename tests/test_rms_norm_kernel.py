"""RMSNorm on moekit's threaded kernel and its backward (`kernels.rms_norm.normalize`): torch's
values and gradients bit for bit (x's two derivatives reaching its gradient one after the other,
behind the residual stream's), and the models that train through it (moekit's LM and every
imported family)."""

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
from moekit.kernels import rms_norm
from moekit.kernels.native import same_bits

# the kernels built for the CPU's other vector set repeat torch's bits too (`make test`'s third leg)
pytestmark = pytest.mark.other_vector_set
KERNEL_NODE = "_RMSNormBackward"


def _residual_block(norm, h, weight, scale, strided_grad):
    """h + norm(h) * scale, the norm's output scaled through a transposed view where
    `strided_grad` (so that its gradient arrives strided); returns the output."""
    y = norm(h, weight)
    if strided_grad:
        return h + (y.transpose(0, 1) * scale).transpose(0, 1)
    return h + y * scale


@needs_loops
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    width=st.integers(1, 300),
    weighted=st.booleans(),
    strided_grad=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_normalises_and_differentiates_as_torch(
    rows, width, weighted, strided_grad, threads, seed
):
    """Forward, dL/dx (behind a residual use) and dL/dweight equal torch.rms_norm's bit for bit,
    on one thread and two, and float64's to rounding."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, rows, width, generator=gen) * 3
    weight = torch.randn(width, generator=gen) if weighted else None
    scale = torch.randn(width, generator=gen)
    grad = torch.randn(2, rows, width, generator=gen)
    results = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for norm in (
            lambda x, w: rms_norm.normalize(x, w, 1e-6),
            lambda x, w: torch.rms_norm(x, (width,), w, 1e-6),
        ):
            x = h.clone().requires_grad_()
            w = None if weight is None else weight.clone().requires_grad_()
            out = _residual_block(norm, x, w, scale, strided_grad)
            out.backward(grad)
            results.append((out, x.grad, w, autograd_node_names(out)))
    finally:
        torch.set_num_threads(previous)
    (ours, our_grad, our_w, names), (theirs, their_grad, their_w, _) = results
    assert KERNEL_NODE in names
    assert same_bits(ours, theirs)
    assert same_bits(our_grad, their_grad)
    if weight is not None:
        assert same_bits(our_w.grad, their_w.grad)
    with torch.no_grad():  # a prompt's prefill
        assert same_bits(
            rms_norm.normalize(h, weight, 1e-6),
            torch.rms_norm(h, (width,), weight, 1e-6),
        )

    exact = h.double() * torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    if weight is not None:
        exact = exact * weight.double()
    torch.testing.assert_close(ours.double() - h.double(), exact * scale.double(), rtol=1e-5, atol=1e-5)


@needs_loops
def test_each_derivative_reaches_x_apart():
    """The two derivatives with respect to x come back as two gradients (the one through x * rstd,
    then the one through x^2), as torch's ops give them; their sum is torch's gradient of a lone
    norm."""
    gen = torch.Generator().manual_seed(0)
    h, weight = torch.randn(5, 24, generator=gen), torch.randn(24, generator=gen)
    scaled, squared = h.clone().requires_grad_(), h.clone().requires_grad_()
    y = rms_norm._RMSNorm.apply(scaled, squared, weight, 1e-6)
    y.backward(torch.ones_like(y))
    torch_scaled, torch_squared = h.clone().requires_grad_(), h.clone().requires_grad_()
    rms_norm.torch_decomposition(torch_scaled, torch_squared, weight, 1e-6).backward(torch.ones_like(y))
    assert same_bits(scaled.grad, torch_scaled.grad)
    assert same_bits(squared.grad, torch_squared.grad)
    assert not torch.equal(scaled.grad, squared.grad)
    lone = h.clone().requires_grad_()
    torch.rms_norm(lone, (24,), weight, 1e-6).backward(torch.ones_like(y))
    assert same_bits(lone.grad, scaled.grad + squared.grad)


def test_what_the_kernel_does_not_take_runs_on_torchs_op():
    """float64, a strided x, a strided weight and a failed probe run torch.rms_norm."""
    x = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(6, requires_grad=True)
    for xs, w in ((x.double(), weight.double()), (x.t(), torch.randn(4)), (x, torch.randn(12)[::2])):
        y = rms_norm.normalize(xs, w, 1e-6)
        assert KERNEL_NODE not in autograd_node_names(y)
        torch.testing.assert_close(y, torch.rms_norm(xs, (xs.shape[-1],), w, 1e-6), rtol=0, atol=0)
    with patch.object(rms_norm, "training_matches_torch", return_value=False):
        assert KERNEL_NODE not in autograd_node_names(rms_norm.normalize(x, weight, 1e-6))


@needs_loops
def test_moekits_lm_trains_through_the_kernel_in_torchs_bits():
    """An fp32 MoE LM (per-head query and key norms too) normalises on the kernel in training,
    and every parameter's gradient is the one torch's op gives, bit for bit."""
    model = training_lm(qk_norm=True)
    ids = torch.randint(0, 64, (3, 24))
    names, torch_names, differing = kernel_against_torch_gradients(
        model, ids, rms_norm, "training_matches_torch"
    )
    assert KERNEL_NODE in names and KERNEL_NODE not in torch_names
    assert not differing


@needs_loops
def test_imported_families_train_through_the_kernel_in_torchs_bits(tmp_path):
    """Every imported family with RMSNorm (all but DBRX, whose norms are LayerNorms) normalises on
    the kernel in training, with torch's gradients bit for bit (Qwen3's per-head query and key
    norms take their strided gradients through torch's ops)."""
    pytest.importorskip(
        "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
    )
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import TINY_CONFIGS, tiny_model

    normalised = []
    for family in TINY_CONFIGS:
        folder = tmp_path / family
        tiny_model(family, seed=4).save_pretrained(folder)
        model = from_hf(folder).train()
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
        names, _, differing = kernel_against_torch_gradients(model, ids, rms_norm, "training_matches_torch")
        assert not differing, family
        has_rms_norm = any(type(m).__name__ == "RMSNorm" for m in model.modules())
        assert (KERNEL_NODE in names) == has_rms_norm, family
        normalised += [family] if has_rms_norm else []
    assert len(normalised) >= len(TINY_CONFIGS) - 1, normalised
