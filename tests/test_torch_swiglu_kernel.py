"""SwiGLU under autograd on moekit's kernel of torch's arithmetic (`kernels.torch_swiglu`): torch's
values and gradients bit for bit, and the shared experts that train through it (moekit's LM and
the imported families with shared experts)."""

from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.kernels.native as native_module
from helpers import (
    autograd_node_names,
    kernel_against_torch_gradients,
    needs_loops,
    training_lm,
)
from moekit.experts.activations import SwiGLU
from moekit.kernels import torch_swiglu
from moekit.kernels.native import same_bits

# the kernels built for the CPU's other vector set repeat torch's bits too (`make test`'s third leg)
pytestmark = pytest.mark.other_vector_set
KERNEL_NODE = "_TorchSwiGLUBackward"


@needs_loops
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    vectors=st.integers(1, 8),
    spread=st.sampled_from([0.1, 4.0, 40.0]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_gives_torchs_swiglu_and_gradients(rows, vectors, spread, threads, seed):
    """silu(gate) * up and its gradient equal torch's ops' bit for bit (up to exp's overflow and
    underflow at a spread of 40), on one thread and two, and float64's to rounding."""
    ff = torch_swiglu.ROW_MULTIPLE * vectors
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 2 * ff, generator=gen) * spread
    grad = torch.randn(rows, ff, generator=gen)
    ours, theirs = h.clone().requires_grad_(), h.clone().requires_grad_()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch_swiglu.swiglu(ours)
        expected = torch_swiglu.torch_swiglu(theirs)
        y.backward(grad)
        expected.backward(grad)
    finally:
        torch.set_num_threads(previous)
    assert KERNEL_NODE in autograd_node_names(y)
    assert same_bits(y, expected)
    assert same_bits(ours.grad, theirs.grad)
    with torch.no_grad():
        assert same_bits(torch_swiglu.swiglu(h), expected)

    exact = h.double().chunk(2, -1)
    torch.testing.assert_close(
        y.double(), torch.nn.functional.silu(exact[0]) * exact[1], rtol=1e-5, atol=1e-5
    )


def test_rows_the_kernel_does_not_take_run_on_torchs_ops():
    """Halves that are not a multiple of 32 values (torch's scalar tail), strided or float64 h,
    and a failed probe: SwiGLU differentiates through torch's ops."""
    base = torch.randn(6, 128, requires_grad=True)
    for h in (torch.randn(6, 2 * 48, requires_grad=True), base.t(), base.double()):
        assert not torch_swiglu.fits(h)
        assert KERNEL_NODE not in autograd_node_names(SwiGLU().forward(h))
    assert torch_swiglu.fits(base) == native_module.loops_available()
    with patch.object(torch_swiglu, "matches_torch", return_value=False):
        assert not torch_swiglu.fits(base)
        assert KERNEL_NODE not in autograd_node_names(SwiGLU().forward(base))


@needs_loops
def test_shared_experts_of_moekits_lm_train_through_the_kernel_in_torchs_bits():
    """An fp32 MoE LM's shared expert (its half 32 wide) runs SwiGLU on the kernel in training,
    and every parameter's gradient is the one torch's ops give, bit for bit."""
    model = training_lm()
    ids = torch.randint(0, 64, (3, 24))
    names, torch_names, differing = kernel_against_torch_gradients(model, ids, torch_swiglu, "matches_torch")
    assert KERNEL_NODE in names and KERNEL_NODE not in torch_names
    assert not differing


@needs_loops
@pytest.mark.parametrize(
    "family, sizes",
    [
        ("qwen2_moe", {"shared_expert_intermediate_size": 64}),
        ("deepseek_v3", {"moe_intermediate_size": 32}),
        ("llama4_text", {"intermediate_size": 32}),
    ],
)
def test_imported_shared_experts_train_through_the_kernel_in_torchs_bits(tmp_path, family, sizes):
    """The imported families with shared experts (their widths a multiple of 32) run them on the
    kernel in training, with torch's gradients bit for bit."""
    pytest.importorskip(
        "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
    )
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import tiny_model

    tiny_model(family, seed=4, **sizes).save_pretrained(tmp_path)
    model = from_hf(tmp_path).train()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    names, _, differing = kernel_against_torch_gradients(model, ids, torch_swiglu, "matches_torch")
    assert KERNEL_NODE in names
    assert not differing
