"""moekit's own kernels for the experts (`csrc/`): the loop over the experts on torch's threads,
its products on moekit's AVX-512/AVX2 tile kernel or on torch's `at::mm`, SwiGLU, built on first use.

Why a loop of our own: an expert's products are small (128 rows x 256 x 256 at 128 experts)
and there are hundreds per step. A library GEMM threaded over the cores spends much of each such
product handing work between threads; here each of torch's threads takes whole experts from a
shared counter within one C++ call and computes them alone (`csrc/expert_tasks.h`).

Two kernels compute an expert's products inside that loop (`expert_kernel`):
- `tile` (`csrc/expert_gemm.cpp`, fp32 on AVX-512 or AVX2 with FMA): reads the operands in place
  and writes into the caller's buffer, SwiGLU and the combine fused in (measured, one core:
  234-264 GFLOP/s against oneDNN's 142-257 on the layer benchmark's expert shapes on AVX-512,
  `benchmarks/native_kernel.py`);
- `mm` (`csrc/expert_mm.cpp`, any floating dtype, any x86 CPU): torch's `at::mm` per product,
  MKL or oneDNN as torch picks, unthreaded inside the loop.
Where both run (fp32 where the tile kernel is built), decode (a few rows per expert) takes the
tile kernel, whose dot products read each weight once, and many rows take whichever kernel a
measurement once per CPU model at first use found faster (`moekit.kernels.store`); elsewhere the
CPU's features and the dtype decide.

Compiled with OpenMP (without it, ATen's parallel_for runs serially: BENCHMARKS.md §13) with the
machine's C++ compiler through torch's extension builder (a few seconds, once; torch caches the
build), for the widest vector set the CPU has, AVX-512 or else AVX2 with FMA (`kernel_isa`; the
tile kernel's register tile follows from it, `csrc/simd.h`; on a CPU with neither only the `mm`
loops are built). Where the build fails or its results disagree with `torch.mm` on a probe, the
experts run on the portable path (`moekit.dispatch.grouped`). `MOEKIT_NATIVE` forces a path, for
debugging: `0` the portable one (and torch's ops for SwiGLU and a decoding step's dense rows too),
`tile` or `mm` that kernel for the experts' products where it runs. `MOEKIT_NATIVE_ISA`
forces the vector set the tile kernel is built for, for testing (`kernel_isa`): `make test` runs
the kernel tests again on the set the CPU does not build by default, AVX2 on an AVX-512 CPU and
the AVX-512 code on an emulation of its intrinsics on an AVX2 one, so that both sets' code is
tested on every machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sysconfig
import time
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    CSRC / "expert_gemm.cpp",
    CSRC / "expert_mm.cpp",
    CSRC / "rms_norm.cpp",
    CSRC / "rope.cpp",
    CSRC / "kv_append.cpp",
    CSRC / "attention_step.cpp",
    CSRC / "topk_rows.cpp",
    CSRC / "counting_sort.cpp",
    CSRC / "torch_swiglu.cpp",
)
HEADERS = (
    CSRC / "simd.h",
    CSRC / "avx512_emulation.h",
    CSRC / "expert_tasks.h",
    CSRC / "torch_sum.h",
    CSRC / "rotation.h",
    CSRC / "swiglu_rows.h",
    CSRC / "combine_rows.h",
)
KERNELS = ("tile", "mm")
# -fopenmp at compile time only: the OpenMP calls bind at load time to the runtime torch already
# loaded, so the kernels' parallel loops share torch's threads and thread count.
COMPILE_FLAGS = ["-O3", "-fopenmp"]
# The vector set's flags, by `kernel_isa`; "avx512-emulated" is the AVX-512 code on an emulation of
# its intrinsics in AVX2 (`csrc/avx512_emulation.h`): correct and several times slower, for tests.
ISA_FLAGS = {
    "avx512": ["-mavx512f"],
    "avx2": ["-mavx2", "-mfma"],
    "avx512-emulated": ["-mavx2", "-mfma", "-DMOEKIT_EMULATE_AVX512", "-Wno-psabi"],
}
# The ops of each kernel (`expert_mm.cpp` is built on every CPU, `expert_gemm.cpp`'s where `kernel_isa`)
TILE_OPS = (
    "mm_into",
    "expert_products",
    "expert_backward_pairs",
    "expert_swiglu_forward",
    "expert_swiglu_rows",
    "topk_swiglu_rows",
    "rows_linear",
    "rows_linear_parts",
    "expert_swiglu_backward",
    "combine_rows",
    "swiglu_into",
    "swiglu_backward_into",
)
MM_OPS = (
    "parallel_width",
    "expert_products_mm",
    "expert_backward_pairs_mm",
    "expert_swiglu_forward_mm",
    "expert_swiglu_backward_mm",
    "combine_rows_any",
)
# (rows, inner, outer) probed against torch.mm: row and column tails, a transposed weight, one row
PROBE_SHAPES = ((13, 40, 70), (6, 64, 64), (1, 17, 3), (70, 300, 129))


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two float32 tensors hold the same values bit for bit, signed zeros included (what the
    kernels' probes against torch require; torch.equal takes -0 for +0)."""
    if a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def same_layout(a: Tensor, b: Tensor) -> bool:
    """The same strides wherever a dimension has more than one element (what lies in memory, which
    decides the order of later sums: the probes require torch's layout too)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


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
    return fits and not (h.requires_grad and torch.is_grad_enabled()) and native_ops_available()


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


def expert_kernel(x: Tensor, *weights: Tensor, decode: bool = False) -> str | None:
    """The kernel of the C++ expert loops for activations like `x` and packed [E, n_out, n_in]
    `weights` here ("tile" or "mm"), or None where the loops do not run (off the CPU, under
    `torch.compile`, no extension, `MOEKIT_NATIVE=0`, integer dtypes). The tile kernel takes fp32
    weights with unit stride along one of their last two dimensions.

    `decode` (a few rows per expert): the tile kernel wherever it runs, unless `MOEKIT_NATIVE`
    forces `mm`. Its dot products read each weight once where at::mm per expert pays a library
    call per product: a layer's decode on at::mm took 1.14-1.48x the tile kernel's time at T=8
    and 1.33-1.70x at T=1 (AVX-512 Xeon, the layer benchmark's shapes; BENCHMARKS.md §13), also
    where at::mm computed many rows faster. Many rows take the measured choice (`float32_kernel`)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or not x.dtype.is_floating_point:
        return None
    requested = _requested()  # (read once: a decoding step asks once per MoE layer)
    if requested == "0" or not all(w.dtype == x.dtype for w in weights) or not _built_and_checked()[1]:
        return None
    tile_fits = x.dtype == torch.float32 and all(1 in (w.stride(-1), w.stride(-2)) for w in weights)
    if not tile_fits:
        return "mm"
    if decode and requested not in KERNELS and native_available():
        return "tile"
    return float32_kernel(requested)


def native_available() -> bool:
    """Whether moekit's tile kernel (AVX-512 or AVX2) runs in this process: not turned off (`MOEKIT_NATIVE`,
    read at every call), built (or found built) once, and checked."""
    return _requested() != "mm" and native_ops_available()


def native_ops_available() -> bool:
    """Whether the tile kernel's library serves the ops that are not expert products (SwiGLU
    passes, a decoding step's dense rows) in this process: built (or found built) once, checked,
    and not turned off with `MOEKIT_NATIVE=0`. `MOEKIT_NATIVE=mm` forces only the experts'
    products onto at::mm: before, it also turned these ops off, so that a run resumed with the
    `mm` its record names computed its dense SwiGLU in other bits than it started with, and a
    dense chain timed beside `mm` experts took 4-8 % longer on torch's SwiGLU (BENCHMARKS.md §13)."""
    return _requested() != "0" and _built_and_checked()[0]


def loops_available() -> bool:
    """Whether the C++ expert loops run in this process (on either kernel)."""
    return _requested() != "0" and _built_and_checked()[1]


def float32_kernel(requested: str | None = None) -> str:
    """The kernel of fp32 expert products over many rows here: as `MOEKIT_NATIVE` forces it
    (`requested`, if read already), else "mm" without the tile kernel, else as measured once on
    this CPU model and stored."""
    requested = _requested() if requested is None else requested
    if not native_available():
        return "mm"
    if requested in KERNELS:
        return requested
    return stored_float32_kernel()


@cache
def stored_float32_kernel() -> str:
    """The stored (else measured and stored) kernel of fp32 expert products, read once per
    process: the store's read (a JSON file and /proc/cpuinfo) took 0.29 ms, which every expert
    plan paid, a decoding step once per MoE layer."""
    from moekit.kernels.store import stored_choice

    return stored_choice(float32_choice_name(kernel_isa()), KERNELS, measure_float32_kernel)


def float32_choice_name(isa: str | None) -> str:
    """The stored choice's name, carrying the kernels' build (`extension_name`: their sources and
    flags): a choice between at::mm and one version of the tile kernel says nothing about the
    next, so a changed kernel is measured again (a choice stored before the tile kernel spread its
    memory requests over its steps named at::mm on an AVX-512 Xeon, where the tile kernel now
    leads). The build also tells a build for another vector set than the CPU's own apart
    (`MOEKIT_NATIVE_ISA`): an emulated kernel's "mm" must not become the CPU's choice."""
    return "experts-many-rows-float32-" + extension_name(isa).rsplit("_", 1)[-1]


def _requested() -> str:
    return os.environ.get("MOEKIT_NATIVE", "auto").strip().lower()


# The one-off measurement: SwiGLU experts of a layer benchmark's fine shape (16 of its 64 experts,
# each with the 192 rows they get at T = 2048; hidden 512, ff 256), forward and backward as the
# layer runs them (`expert_swiglu_forward` and `_backward`: both products, the activation and the
# routing weight per expert, and at::mm's gathers); rounds interleave the kernels, each first in
# every other round, so that load slows both alike. (With 96 rows per expert, half the layer's,
# at::mm's share of the time was larger than in the layer: on an AVX-512 Xeon the measurement gave
# the tile kernel 0.6-3 % where the layer's fwd+bwd gave it 8-9 %; with 192, 3-4.5 %.)
MEASURE_SHAPE = (16, 192, 512, 256)
MEASURE_ROUNDS = 7


def measure_float32_kernel() -> str:
    """ "mm" if torch's products made SwiGLU experts' forward and backward faster than the tile
    kernel on torch's threads (the median of the rounds' ratios), else "tile" (~0.3 s).

    The layer's path, not the products alone: on an AVX-512 Xeon (family 6 model 207) at::mm's
    forward products alone were up to 23 % faster than the tile kernel's while its SwiGLU passes,
    their activation then scalar, took 1.04-1.29x the tile kernel's time; with the activation in
    vectors they took 0.84-0.96x (five shapes). No margin for either kernel: decode, where the
    tile kernel is well ahead, does not follow this choice (`expert_kernel`), so a near tie costs
    little either way (BENCHMARKS.md §13)."""
    experts, rows, hidden, ff = MEASURE_SHAPE
    gen = torch.Generator().manual_seed(0)
    count, tokens = experts * rows, experts * rows // 2
    x = torch.randn(tokens, hidden, generator=gen)
    token = torch.randint(0, tokens, (count,), generator=gen)
    scale = torch.rand(count, generator=gen)
    w_in = torch.randn(experts, 2 * ff, hidden, generator=gen) * hidden**-0.5
    w_out = torch.randn(experts, hidden, ff, generator=gen) * ff**-0.5
    grad = torch.randn(tokens, hidden, generator=gen)
    h, ys, grad_xs = x.new_empty(count, 2 * ff), x.new_empty(count, hidden), x.new_empty(count, hidden)
    grad_w_in, grad_w_out, grad_scale = torch.empty_like(w_in), torch.empty_like(w_out), x.new_empty(count)
    tasks = torch.tensor([(e, e * rows, (e + 1) * rows) for e in range(experts)], dtype=torch.long)
    threads = torch.get_num_threads()

    def seconds(suffix: str) -> float:
        ops = torch.ops.moekit
        start = time.perf_counter()
        getattr(ops, "expert_swiglu_forward" + suffix)(x, token, scale, w_in, w_out, h, ys, tasks, threads)
        getattr(ops, "expert_swiglu_backward" + suffix)(
            grad, x, token, scale, w_in, w_out, h, grad_w_in, grad_w_out, grad_scale, grad_xs, tasks, threads
        )
        return time.perf_counter() - start

    seconds(""), seconds("_mm")  # warm both
    ratios = []
    for round_ in range(MEASURE_ROUNDS):  # each kernel first in every other round
        if round_ % 2 == 0:
            tile = seconds("")
            mm = seconds("_mm")
        else:
            mm = seconds("_mm")
            tile = seconds("")
        ratios.append(mm / tile)
    return "mm" if statistics.median(ratios) < 1.0 else "tile"


@cache
def _built_and_checked() -> tuple[bool, bool]:
    """(tile kernel runs, expert loops run): built once, each checked against torch.mm. The first
    call may come inside a bf16 forward: autocast must not recast the probes' fp32 reference
    products (it raised 'Float did not match BFloat16' in a layer's first forward under autocast)."""
    if not _build_and_load():
        return False, False
    with torch.autocast("cpu", enabled=False):
        return _probes_pass()


def _probes_pass() -> tuple[bool, bool]:
    loops = all(hasattr(torch.ops.moekit, op) for op in MM_OPS) and _loops_match_torch()
    tile = (
        kernel_isa() is not None
        and all(hasattr(torch.ops.moekit, op) for op in TILE_OPS)
        and _probe_matches_torch()
    )
    return tile and loops, loops


def cpu_isa() -> str | None:
    """The widest vector set the CPU has for the tile kernel: "avx512", "avx2" (AVX2 with FMA, which
    torch's AVX2 capability implies), or None where it has neither (only the `mm` loops)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else None


def kernel_isa() -> str | None:
    """The vector set the tile kernel is built for here: the CPU's own (`cpu_isa`), unless
    `MOEKIT_NATIVE_ISA` asks for another that runs on it, for testing: `avx2` (on an AVX-512 CPU),
    `avx512-emulated` (on either), or `other`, whichever of the two is not the CPU's own set."""
    own = cpu_isa()
    requested = os.environ.get("MOEKIT_NATIVE_ISA", "").strip().lower()
    if not requested or own is None:
        return own
    if requested == "other":
        return "avx2" if own == "avx512" else "avx512-emulated"
    runs_here = {"avx512": ("avx512", "avx2", "avx512-emulated"), "avx2": ("avx2", "avx512-emulated")}[own]
    if requested not in runs_here:
        warnings.warn(
            f"moekit: MOEKIT_NATIVE_ISA={requested!r} ignored: this CPU's tile kernel can be built for "
            f"{', '.join(runs_here)} or `other`; building for {own}",
            RuntimeWarning,
            stacklevel=2,
        )
        return own
    return requested


def compile_flags(isa: str | None) -> list[str]:
    return [*COMPILE_FLAGS, *ISA_FLAGS.get(isa, [])]


def extension_name(isa: str | None) -> str:
    """Named by the sources' and flags' hash: torch caches builds by name, and a build of other
    source (another moekit version) or for another vector set must be neither reused nor overwritten."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS)))
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
            [str(path) for path in SOURCES],
            extra_cflags=compile_flags(isa),
            extra_include_paths=[str(CSRC)],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the portable path remains
        warnings.warn(
            f"moekit: could not build the native expert kernels ({type(error).__name__}: {error}); "
            "experts run on the portable path (torch.mm per expert) instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


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


def _loops_match_torch() -> bool:
    """The at::mm expert loop on the probe shapes, one expert each, against torch.mm."""
    gen = torch.Generator().manual_seed(0)
    for rows, inner, outer in PROBE_SHAPES:
        a = torch.randn(rows, inner, generator=gen)
        weights = torch.randn(2, outer, inner, generator=gen)
        out = torch.full((rows, outer), float("nan"))
        tasks = torch.tensor([[1, 0, rows]], dtype=torch.long)
        torch.ops.moekit.expert_products_mm(a, weights, out, tasks, 1)
        if not torch.allclose(out, a @ weights[1].t(), rtol=1e-4, atol=1e-4):
            return False
    return True
