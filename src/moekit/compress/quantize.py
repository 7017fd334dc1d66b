"""Expert weight quantization: group-wise round-to-nearest and GPTQ per expert, and MC-MoE's
per-expert bit widths chosen by an integer program (scipy's `milp`, HiGHS).

Weights are quantized along their input dimension in groups of `group_size` columns, asymmetric
min-max per (row, group): q = clamp(round(w / s) + z, 0, 2^b - 1), w ~ (q - z) s. The router is
never quantized (a 4-bit router picks the wrong experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError


@dataclass
class Quantized:
    """Codes [rows, cols] (uint8, values < 2^bits), per (row, group) scales and zero points."""

    codes: Tensor
    scales: Tensor  # [rows, groups] float32
    zeros: Tensor  # [rows, groups] float32 (integers)
    bits: int
    group_size: int

    def dequantize(self) -> Tensor:
        """float64 [rows, cols]."""
        scale = self.scales.double().repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]
        zero = self.zeros.double().repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]
        return (self.codes.double() - zero) * scale

    def packed_bytes(self) -> int:
        """Storage of the packed codes plus fp16 scales and 8-bit zero points."""
        return (self.codes.numel() * self.bits + 7) // 8 + self.scales.numel() * 2 + self.zeros.numel()


FP16_MAX = 65504.0


def fp16_ceil(x: Tensor) -> Tensor:
    """The smallest float16 value >= each positive `x` (float64 out): scales are stored in fp16,
    so the quantizer computes with exactly the value it stores, rounded up so the group's range
    still fits in 2^bits - 1 steps."""
    half = x.clamp(max=FP16_MAX).half()
    below = half.double() < x
    bumped = (half.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below & (half < FP16_MAX), bumped, half).double()


def group_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Min-max (scale, zero) per row of `w` [rows, g] (the group), float64 [rows]; the scale is a
    float16 value (what packed storage keeps) and the zero point an integer in [0, 2^bits)."""
    top = float(2**bits - 1)
    low = w.min(dim=1).values.clamp(max=0.0)
    high = w.max(dim=1).values.clamp(min=0.0)
    scale = fp16_ceil((high - low) / top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, top)
    return scale, zero


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def check_bits(bits: int, group_size: int, field: str = "quantize") -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"{field}.bits", f"got {bits!r}, expected one of 2, 3, 4, 8")
    if group_size < 1:
        raise ConfigError(f"{field}.group_size", f"got {group_size!r}, expected a positive integer")


def rtn(w: Tensor, bits: int, group_size: int) -> Quantized:
    """Round-to-nearest, group-wise, of `w` [rows, cols]."""
    check_bits(bits, group_size)
    w = w.detach().double()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, cols, group_size):
        part = w[:, start : start + group_size]
        scale, zero = group_params(part, bits)
        codes[:, start : start + group_size] = quantize_column(part, scale[:, None], zero[:, None], bits).to(
            torch.uint8
        )
        scales.append(scale)
        zeros.append(zero)
    return Quantized(codes, torch.stack(scales, 1).float(), torch.stack(zeros, 1).float(), bits, group_size)


def gptq(w: Tensor, hessian: Tensor, bits: int, group_size: int, damp: float = 0.01) -> Quantized:
    """GPTQ (Frantar et al. 2023, Algorithm 1) of `w` [rows, cols] for inputs with second moment
    `hessian` [cols, cols] (sum of x x^T): quantize column by column, spreading each column's error
    over the columns not yet quantized through the inverse Hessian's Cholesky factor. Group scales
    are set from the (updated) weights when a group starts, as in the reference `--groupsize`.
    Columns no calibration input ever reached (zero diagonal) get H_ii = 1, i.e. plain RTN there.
    MoEQuant's affinity-guided variant is this with the gate-weighted Hessian."""
    check_bits(bits, group_size)
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(cols, dtype=h.dtype) * damp * float(torch.diagonal(h).mean())
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise MoekitError(
            "gptq: the calibration Hessian is not positive definite even after damping"
        ) from None
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales, zeros = [], []
    for i in range(cols):
        if i % group_size == 0:
            scale, zero = group_params(w[:, i : i + group_size], bits)
            scales.append(scale)
            zeros.append(zero)
        q = quantize_column(w[:, i], scale, zero, bits)
        codes[:, i] = q.to(torch.uint8)
        error = (w[:, i] - (q - zero) * scale) / upper[i, i]
        w[:, i + 1 :] -= error[:, None] * upper[i, i + 1 :][None, :]
    return Quantized(codes, torch.stack(scales, 1).float(), torch.stack(zeros, 1).float(), bits, group_size)


def output_error(w: Tensor, q: Tensor, hessian: Tensor) -> float:
    """sum_x ||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T): the squared output error the quantization
    causes on the calibration inputs whose second moment is `hessian`."""
    delta = w.double() - q.double()
    return float(torch.einsum("ri,ij,rj->", delta, hessian.double(), delta))


def allocate_bits(
    cost: np.ndarray,
    choices: list[int],
    sizes: np.ndarray,
    mean_bits: float,
    forced: np.ndarray | None = None,
) -> np.ndarray:
    """MC-MoE's pre-loading mixed-precision allocation (Huang et al. 2025, "Mixture Compressor for
    MoE LLMs Gains More", §3.2, Eq. 6) as an integer program: choose one bit width per expert,
    minimising sum_e cost[e, b] subject to sum_e bits_e * sizes_e <= mean_bits * sum_e sizes_e.
    The paper weighs frequency, gate weight and quantization loss with exponents and solves it
    with Gurobi; here `cost` is the expert's gate-weighted output error (which contains all three)
    and the solver is HiGHS. `forced` (bool [N]) experts get the widest choice (super experts).
    Returns the chosen bits per expert [N]."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, b = cost.shape
    choices_arr = np.asarray(choices, dtype=float)
    if mean_bits < choices_arr.min():
        raise ConfigError(
            "quantize.mean_bits", f"got {mean_bits}, below the smallest choice {choices_arr.min():g}"
        )
    one_each = np.kron(np.eye(n), np.ones(b))
    budget = (sizes[:, None] * choices_arr[None, :]).reshape(1, -1)
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(budget, -np.inf, mean_bits * sizes.sum()),
    ]
    lower = np.zeros(n * b)
    if forced is not None:
        lower.reshape(n, b)[forced, int(np.argmax(choices_arr))] = 1
    scale = max(float(np.abs(cost).max()), 1e-300)
    result = milp(
        cost.reshape(-1) / scale, constraints=constraints, integrality=np.ones(n * b), bounds=Bounds(lower, 1)
    )
    if result.x is None:
        raise ConfigError(
            "quantize.mean_bits", f"no allocation fits mean {mean_bits} bits ({result.message})"
        )
    pick = np.round(result.x).reshape(n, b).argmax(1)
    return choices_arr[pick].astype(int)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes (uint8, < 2^bits) as a dense little-endian bit stream, uint8 [ceil(n * bits / 8)]:
    code i occupies stream bits [i*bits, (i+1)*bits), least significant first, and stream bit t
    is bit t % 8 of byte t // 8. So 4-bit codes are two per byte (low nibble first), 2-bit four per
    byte, 8-bit one per byte, and 3-bit eight per three bytes (one 24-bit little-endian word):
    `moekit.experts.quantized.unpack` reads each with a few shifts."""
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """The reference inverse of `pack_codes` (bit by bit, numpy)."""
    n = int(np.prod(shape))
    planes = (
        np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits).astype(np.uint8)
    )
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint8)).sum(1).astype(np.uint8)).reshape(
        shape
    )
