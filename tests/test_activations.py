import pytest
import torch

from helpers import autograd_node_names
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATION_NAMES, make_activation


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_backward_matches_autograd_in_float64(name):
    act = make_activation(name, alpha=1.702, limit=1.5)  # a small limit so the clamps are active
    ff = 7
    h = (torch.randn(11, act.in_features(ff), dtype=torch.float64) * 2).requires_grad_()
    grad = torch.randn(11, ff, dtype=torch.float64)
    out = act.forward(h)
    assert out.shape == (11, ff)
    (expected,) = torch.autograd.grad(out, h, grad)
    got = act.backward(h.detach(), grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_clamped_swiglu_is_gpt_oss_formula():
    act = make_activation("clamped_swiglu", alpha=1.702, limit=7.0)
    gate = torch.tensor([[-1.0, 0.5, 9.0]], dtype=torch.float64)
    up = torch.tensor([[8.0, -9.0, 0.25]], dtype=torch.float64)
    out = act.forward(torch.cat([gate, up], dim=1))
    g = gate.clamp(max=7.0)
    u = up.clamp(-7.0, 7.0)
    expected = (u + 1) * g * torch.sigmoid(1.702 * g)
    torch.testing.assert_close(out, expected)
    assert out[0, 0] == pytest.approx(8.0 * -1.0 * (1 / (1 + 2.718281828459045**1.702)), rel=1e-6)


def test_unknown_activation_names_the_field():
    with pytest.raises(ConfigError, match="experts.activation"):
        make_activation("tanh")


@pytest.mark.parametrize("name", [n for n in ACTIVATION_NAMES if make_activation(n).gated])
def test_gated_halves_differentiate_as_slices_without_zero_filled_copies(name):
    """A shared expert differentiates through a gated activation's torch form: its halves, taken
    as chunks, give the slices' values and gradients bit for bit, and the graph has no slice
    backward (each zero-fills a copy of h)."""
    act = make_activation(name)
    ff = 24
    h = torch.randn(64, act.in_features(ff)).requires_grad_()
    grad = torch.randn(64, ff)
    out = act.forward(h)
    (got,) = torch.autograd.grad(out, h, grad)

    def sliced(t):
        return t[..., :ff], t[..., ff:]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(act), "split", lambda self, t: sliced(t))
        expected_out = act.forward(h)
        (expected,) = torch.autograd.grad(expected_out, h, grad)
    assert torch.equal(out, expected_out) and torch.equal(got, expected)
    names = autograd_node_names(out)
    assert not any("Slice" in n for n in names) and any("Split" in n for n in names)
