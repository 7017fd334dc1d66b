"""Routed experts held as packed integer codes, dequantized on the fly for the experts in use.

Each expert's two matrices are stored at that expert's own bit width (2, 3, 4 or 8; MC-MoE's
allocation gives experts different widths) as a packed bit stream (`moekit.compress.quantize.
pack_codes`) with one float16 scale and one integer zero point per (row, group of `group_size`
input columns): w[r, c] = (code[r, c] - zero[r, c // g]) * scale[r, c // g]. Only this packed form
is resident. A call dequantizes, one at a time, the experts that tokens were routed to into a
buffer reused across experts and calls, and runs each on its rows: memory is saved, compute per
token pays the dequantization (BENCHMARKS.md §11).

The weights are exactly those of the fake-quantized model (`Quantized.dequantize`): an integer
below 2^8 times a float16 scale is exact in float32 (and float64), so the two models' outputs
differ only by the order of summation. Inference only: the codes have no gradient.

Tensors per part (`in`: rows = `activation.in_features(ff)`, cols = hidden, as `PackedExperts.
w_in`; `out`: rows = hidden, cols = ff):
- `codes_{part}` uint8 [bytes]: every expert's row-major codes, packed, one expert after another;
- `scales_{part}` int16 [E, rows, groups]: float16 bit patterns (so casting the model to another
  dtype never rounds them);
- `zeros_{part}` uint8 [E, rows, groups].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.device import autocast_dtype, no_autocast
from moekit.experts.activations import Activation
from moekit.routing.record import Routing

BIT_WIDTHS = (2, 3, 4, 8)
PARTS = ("in", "out")


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` codes of `bits` bits in `pack_codes`'s stream."""
    return (count * bits + 7) // 8


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """uint8 [count] codes from `pack_codes`'s little-endian stream, with a few shifts (no loop
    over bits): 2/4/8 bits are whole fields of a byte, 3 bits eight fields of a 24-bit word."""
    if bits == 8:
        return packed[:count]
    if bits in (2, 4):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    if bits != 3:
        raise ValueError(f"unpack: got {bits} bits, expected one of {BIT_WIDTHS}")
    words = -(-packed.numel() // 3)
    if packed.numel() != 3 * words:
        packed = F.pad(packed, (0, 3 * words - packed.numel()))
    b = packed.view(words, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word[:, None] >> shifts) & 7).to(torch.uint8).reshape(-1)[:count]


class QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer in packed integer form (`compute` as PackedExperts)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ff_size: int,
        activation: Activation,
        bits: Sequence[int],
        group_size: int,
        bias: bool = False,
    ):
        super().__init__()
        if len(bits) != num_experts or any(b not in BIT_WIDTHS for b in bits):
            raise ValueError(f"bits: expected {num_experts} widths from {BIT_WIDTHS}, got {list(bits)}")
        if group_size < 1:
            raise ValueError(f"group_size: expected a positive integer, got {group_size}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ff_size = ff_size
        self.activation = activation
        self.bits = tuple(int(b) for b in bits)
        self.group_size = group_size
        in_features = activation.in_features(ff_size)
        self.shapes = {"in": (in_features, hidden_size), "out": (hidden_size, ff_size)}
        self.offsets: dict[str, tuple[int, ...]] = {}
        for part, (rows, cols) in self.shapes.items():
            starts = [0]
            for b in self.bits:
                starts.append(starts[-1] + packed_size(rows * cols, b))
            self.offsets[part] = tuple(starts)
            groups = -(-cols // group_size)
            self.register_buffer(f"codes_{part}", torch.zeros(starts[-1], dtype=torch.uint8))
            self.register_buffer(f"scales_{part}", torch.zeros(num_experts, rows, groups, dtype=torch.int16))
            self.register_buffer(f"zeros_{part}", torch.zeros(num_experts, rows, groups, dtype=torch.uint8))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_features), requires_grad=False) if bias else None
        self.b_out = (
            nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False) if bias else None
        )
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    # -- filling and reading one expert ----------------------------------------------------------

    def set_expert(self, expert: int, part: str, codes: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Store expert `expert`'s `part` from unpacked codes (uint8 [rows, cols]), float scales
        (float16-representable) and integer zero points ([rows, groups])."""
        from moekit.compress.quantize import pack_codes

        rows, cols = self.shapes[part]
        if tuple(codes.shape) != (rows, cols):
            raise ValueError(f"expert {expert} {part}: codes {tuple(codes.shape)}, expected {(rows, cols)}")
        start, stop = self.offsets[part][expert], self.offsets[part][expert + 1]
        getattr(self, f"codes_{part}")[start:stop] = pack_codes(codes.cpu(), self.bits[expert])
        half = scales.to(torch.float16)
        if not torch.equal(half.double(), scales.double()):
            raise ValueError(f"expert {expert} {part}: scales are not float16 values")
        getattr(self, f"scales_{part}")[expert] = half.view(torch.int16)
        getattr(self, f"zeros_{part}")[expert] = zeros.to(torch.uint8)

    def codes(self, expert: int, part: str) -> Tensor:
        """Expert `expert`'s `part` codes, uint8 [rows, cols]."""
        rows, cols = self.shapes[part]
        start, stop = self.offsets[part][expert], self.offsets[part][expert + 1]
        stream = getattr(self, f"codes_{part}")[start:stop]
        return unpack(stream, self.bits[expert], rows * cols).view(rows, cols)

    def dequantize_into(self, expert: int, part: str, buffer: Tensor) -> Tensor:
        """Expert `expert`'s `part` weights [rows, cols], written into `buffer` (1-D, at least
        rows * groups * group_size elements, float32 or float64) and returned as a view of it."""
        rows, cols = self.shapes[part]
        g = self.group_size
        groups = -(-cols // g)
        w = buffer[: rows * groups * g].view(rows, groups, g)
        w.view(rows, groups * g)[:, :cols].copy_(self.codes(expert, part))
        scale = getattr(self, f"scales_{part}")[expert].view(torch.float16).to(buffer.dtype)
        zero = getattr(self, f"zeros_{part}")[expert].to(buffer.dtype)
        w.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        return w.view(rows, groups * g)[:, :cols]

    def dequantize(self, expert: int, part: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """A fresh dequantized copy of one expert's matrix (float32 or float64)."""
        rows, cols = self.shapes[part]
        groups = -(-cols // self.group_size)
        buffer = torch.empty(rows * groups * self.group_size, dtype=dtype, device=self.codes_in.device)
        return self.dequantize_into(expert, part, buffer).clone()

    def scratch(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The reused dequantization buffer for `dtype` on `device` (big enough for either part)."""
        key = (dtype, device)
        if key not in self._scratch:
            size = max(r * -(-c // self.group_size) * self.group_size for r, c in self.shapes.values())
            self._scratch[key] = torch.empty(size, dtype=dtype, device=device)
        return self._scratch[key]

    def scratch_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    # -- compute ---------------------------------------------------------------------------------

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert on rows `x` [n, d], unweighted; the readable definition `compute` matches."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        w_in = self.dequantize(expert, "in", dtype).to(x.dtype)
        w_out = self.dequantize(expert, "out", dtype).to(x.dtype)
        b_in = None if self.b_in is None else self.b_in[expert].to(x.dtype)
        b_out = None if self.b_out is None else self.b_out[expert].to(x.dtype)
        return F.linear(self.activation.forward(F.linear(x, w_in, b_in)), w_out, b_out)

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        """Sum over the routing's kept compute assignments of weight * expert(x[token]), each
        routed expert dequantized in turn into the reused buffer (`backend` is not used: there is
        one path). Under autocast, in the autocast dtype, as PackedExperts."""
        dtype = autocast_dtype(x)
        if dtype is not None:
            x = x.to(dtype)
        a = routing.compute_assignments
        out = torch.zeros_like(x)
        if len(a) == 0:
            return out
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        # a buffer autograd saved for backward must not be overwritten: fresh ones then
        reuse = not (torch.is_grad_enabled() and x.requires_grad)
        buffer = self.scratch(work, x.device)
        counts = torch.bincount(a.expert, minlength=self.num_experts).tolist()
        with no_autocast(x):
            start = 0
            for e, count in enumerate(counts):
                if not count:
                    continue
                stop = start + count
                token = a.token[start:stop]
                scale = a.weight[start:stop].to(x.dtype).unsqueeze(1)
                rows = x.index_select(0, token)
                if weight_on == "input":
                    rows = rows * scale
                w_in = self.dequantize_into(e, "in", buffer if reuse else torch.empty_like(buffer))
                h = F.linear(rows, w_in.to(x.dtype), None if self.b_in is None else self.b_in[e].to(x.dtype))
                act = self.activation.forward(h)
                if weight_on == "output":
                    act = act * scale
                w_out = self.dequantize_into(e, "out", buffer if reuse else torch.empty_like(buffer))
                y = F.linear(act, w_out.to(x.dtype))
                if self.b_out is not None:
                    bias = self.b_out[e].to(x.dtype)
                    y = y + (bias * scale if weight_on == "output" else bias)
                out.index_add_(0, token, y)
                start = stop
        return out

    def extra_repr(self) -> str:
        widths = {b: self.bits.count(b) for b in sorted(set(self.bits))}
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, ff={self.ff_size}, "
            f"activation={self.activation.name}, bits={widths}, group_size={self.group_size}, "
            f"bias={self.b_in is not None}"
        )
