"""moekit's own kernels for the experts (`csrc/expert_gemm.cpp`): small GEMMs, the loop over the
experts, and SwiGLU, built on first use.

Why a kernel of our own: an expert's products are small (128 rows x 256 x 256 at 128 experts)
and there are hundreds per step. oneDNN, the fastest library kernel torch ships for them, costs
~10 us per call, repacks the weight on every call and returns a new tensor the caller must copy
into its buffer; its weight gradients over so few rows run well below the core's peak. The kernel
here reads the operands in place, writes into the caller's buffer, and runs each expert on one
of torch's threads, the threads taking whole experts from a shared counter within one call
(measured, one core: 234-264 GFLOP/s against oneDNN's 142-257 on the layer benchmark's expert
shapes, `benchmarks/native_kernel.py`).

It is compiled with OpenMP (without it, ATen's parallel_for runs serially: BENCHMARKS.md §13)
for the widest vector set the CPU has, AVX-512 or else AVX2 with FMA (`kernel_isa`; the register
tile follows from it, `csrc/simd.h`), with the machine's C++ compiler through torch's extension
builder (a few seconds, once; torch caches the build). Where the CPU has neither, the build fails,
or its results disagree with `torch.mm` on a probe, products stay on `moekit.kernels.gemm`.
`MOEKIT_NATIVE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sysconfig
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "expert_gemm.cpp"
HEADERS = (Path(__file__).parent / "csrc" / "simd.h",)
# -fopenmp at compile time only: the OpenMP calls bind at load time to the runtime torch already
# loaded, so the kernels' parallel loops share torch's threads and thread count.
COMPILE_FLAGS = ["-O3", "-fopenmp"]
# The vector set's flags, by `kernel_isa`
ISA_FLAGS = {"avx512": ["-mavx512f"], "avx2": ["-mavx2", "-mfma"]}
OPS = (
    "mm_into",
    "expert_products",
    "expert_backward_pairs",
    "expert_swiglu_forward",
    "expert_swiglu_backward",
    "combine_rows",
    "parallel_width",
    "swiglu_into",
    "swiglu_backward_into",
)
# (rows, inner, outer) probed against torch.mm: row and column tails, a transposed weight, one row
PROBE_SHAPES = ((13, 40, 70), (6, 64, 64), (1, 17, 3), (70, 300, 129))


def mm_into(a: Tensor, b: Tensor, out: Tensor, prefetch_next: Tensor | None = None) -> None:
    """out = a @ b on the native kernel (fp32 CPU, 2-D; `out` with unit column stride; `b` with unit
    stride along either dimension). Only where `native_available()`. `prefetch_next`: a dense
    tensor (the next expert's weights) whose memory the product pulls into cache as it runs:
    measured on one core over 128 experts' cold weights, 161 -> 198 GFLOP/s for 128 x 128 x 256
    forward products, 191 -> 205 for their input gradients (hot: 213, 221)."""
    torch.ops.moekit.mm_into(a, b, out, prefetch_next)


def swiglu_fits(h: Tensor) -> bool:
    """Whether SwiGLU of `h` [rows, 2 ff] can run on the native kernel: fp32 CPU rows with unit
    column stride, outside autograd (the kernel has no derivative of its own: the grouped
    path's backward calls `swiglu_backward`), the kernel available, and not under `torch.compile`
    (which cannot trace into the extension and fuses SwiGLU itself)."""
    if torch.compiler.is_compiling():
        return False
    fits = h.dim() == 2 and h.dtype == torch.float32 and h.device.type == "cpu" and h.stride(-1) == 1
    return fits and not (h.requires_grad and torch.is_grad_enabled()) and native_available()


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] in one pass over h (where `swiglu_fits`), the rows split
    over torch's threads. torch's silu and mul read the two halves as strided views, which costs
    them: silu of the [16384, 128] gate half of h took 0.98 ms on two threads, 0.29 ms contiguous."""
    out = h.new_empty(h.shape[0], h.shape[1] // 2)
    torch.ops.moekit.swiglu_into(h, out)
    return out


def swiglu_backward(h: Tensor, grad: Tensor) -> Tensor:
    """dL/dh of `swiglu` given dL/da, in one pass over h and the gradient (torch's takes four)."""
    out = torch.empty_like(h)
    torch.ops.moekit.swiglu_backward_into(h, grad if grad.stride(-1) == 1 else grad.contiguous(), out)
    return out


def native_fits(x: Tensor, *weights: Tensor) -> bool:
    """Whether products of activations like `x` with packed [E, n_out, n_in] `weights` can run on
    the native kernel here: fp32 on the CPU, each weight with unit stride along one of its last
    two dimensions, and the kernel available (never under `torch.compile`)."""
    if torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if not all(w.dtype == torch.float32 and 1 in (w.stride(-1), w.stride(-2)) for w in weights):
        return False
    return native_available()


def native_available() -> bool:
    """Whether the native kernel runs in this process: not turned off (`MOEKIT_NATIVE=0`, read at
    every call), built (or found built) once, and checked."""
    return os.environ.get("MOEKIT_NATIVE", "1") != "0" and _built_and_checked()


@cache
def _built_and_checked() -> bool:
    return kernel_isa() is not None and _build_and_load() and _probe_matches_torch()


def cpu_has_avx512() -> bool:
    return kernel_isa() == "avx512"


def kernel_isa() -> str | None:
    """The vector set the native kernel is built for here: "avx512", "avx2" (AVX2 with FMA, which
    torch's AVX2 capability implies), or None where the CPU has neither."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else None


def compile_flags(isa: str) -> list[str]:
    return [*COMPILE_FLAGS, *ISA_FLAGS[isa]]


def extension_name(isa: str) -> str:
    """Named by the sources' and flags' hash: torch caches builds by name, and a build of other
    source (another moekit version) or for another vector set must be neither reused nor overwritten."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (SOURCE, *HEADERS)))
    digest.update(" ".join(compile_flags(isa)).encode())
    return "moekit_expert_gemm_" + digest.hexdigest()[:12]


def _build_and_load() -> bool:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # torch's builder runs `ninja` from PATH; pip put ours here
        scripts = sysconfig.get_path("scripts")
        os.environ["PATH"] = os.pathsep.join((scripts, os.environ.get("PATH", "")))
    try:
        isa = kernel_isa()
        cpp_extension.load(
            extension_name(isa),
            [str(SOURCE)],
            extra_cflags=compile_flags(isa),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: gemm.py's kernels remain
        warnings.warn(
            f"moekit: could not build the native expert kernel ({type(error).__name__}: {error}); "
            "expert products use torch's kernels instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return all(hasattr(torch.ops.moekit, op) for op in OPS)


def _probe_matches_torch() -> bool:
    gen = torch.Generator().manual_seed(0)
    for rows, inner, outer in PROBE_SHAPES:
        a = torch.randn(rows, inner, generator=gen)
        weight = torch.randn(outer, inner, generator=gen)
        for b in (weight.t(), weight.t().contiguous()):
            out = torch.full((rows, outer), float("nan"))
            mm_into(a, b, out)
            if not torch.allclose(out, a @ b, rtol=1e-4, atol=1e-4):
                return False
    return True
