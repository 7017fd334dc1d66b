"""RoPE's rotation ("half" layout) of a decoding step's few fp32 rows in one call of moekit's
kernel (`csrc/rope.cpp`), where it gives torch's values bit for bit (decided once per process by a
probe, like `kernels.rms_norm`; `MOEKIT_NATIVE=0` at the first use turns it off with the others).

transformers' x * cos + rotate_half(x) * sin is five ops with their own setup each (about 10 us
for a step's queries and keys on one core of an AVX2 EPYC), twice per layer of a decoding step;
the arithmetic is two products and a sum per value, which the kernel repeats in torch's order.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native

# Elements above which torch's vectorised, threaded ops are left to do the rotation.
MAX_ELEMENTS = 32768


def fits(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rotate_half_rows(x, cos, sin)` runs on the kernel: small contiguous fp32 CPU
    operands of the shapes it takes, outside autograd, where the probe passed."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or x.numel() > MAX_ELEMENTS:
        return False
    table = (x.shape[0], 1, x.shape[2], x.shape[3])
    for t in (cos, sin):
        if t.dtype != torch.float32 or t.shape != table or not t.is_contiguous():
            return False
    if not x.is_contiguous() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, cos, sin)):
        return False
    return matches_torch()


def rotate_half_rows(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + roll(x, D / 2) * sin (where `fits`): `interop.rope.apply_rope`'s "half" layout."""
    return torch.ops.moekit.rope_half_rows(x, cos, sin)


def torch_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The ops the kernel stands in for (`interop.rope.apply_rope`, "half")."""
    return (x * cos) + (torch.roll(x, x.shape[-1] // 2, dims=-1) * sin)


@cache
def matches_torch() -> bool:
    """Whether the kernel is built and gives torch's values bit for bit on the probe."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "rope_half_rows"):
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        for batch, heads, steps, width in ((1, 6, 1, 16), (2, 20, 1, 64), (1, 3, 5, 128), (3, 1, 1, 2)):
            x = torch.randn(batch, heads, steps, width, generator=gen) * 3
            cos = torch.randn(batch, 1, steps, width, generator=gen)
            sin = torch.randn(batch, 1, steps, width, generator=gen)
            if not torch.equal(torch.ops.moekit.rope_half_rows(x, cos, sin), torch_rotation(x, cos, sin)):
                return False
    return True
