"""moekit's own expert kernels (`moekit.kernels.native`) against float64: the tile GEMM on every
operand layout the expert loops use and on ragged shapes, the loops over the experts on one thread
or several on either kernel (the tile kernel, torch's at::mm), the choice between them, the combine,
and SwiGLU with its derivative."""

import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import cpp_extension

from helpers import autograd_node_names, needs_loops, needs_tile_kernel, torch_threads
from moekit.dispatch.grouped import NativeLoops, grouped_experts, plan_experts
from moekit.experts.activations import make_activation, swiglu_with_grad
from moekit.kernels import native, rows_linear
from moekit.kernels.native import (
    expert_kernel,
    extension_name,
    kernel_isa,
    loops_available,
    mm_into,
    native_available,
    swiglu_fits,
)
from moekit.models.lm import DenseFFN

# also run by `make test` on the kernel built for the CPU's other vector set
pytestmark = pytest.mark.other_vector_set

# The loops' kernels: the op-name suffix of each, and whether it runs here
LOOP_KERNELS = {"tile": ("", native_available), "mm": ("_mm", loops_available)}


def loop_op(name: str, kernel: str):
    suffix, runs = LOOP_KERNELS[kernel]
    if not runs():
        pytest.skip(
            f"the {kernel} kernel does not run here (off with MOEKIT_NATIVE; the tile kernel needs "
            "AVX-512 or AVX2, both a compiler and a first-use check against torch that agreed)"
        )
    return getattr(torch.ops.moekit, name + suffix)


# How each layout the expert loops use is formed from a [rows, inner] input, a weight [outer, inner]
# and gradient rows [rows, outer] (a, b): forward x @ W^T, input gradient g @ W, weight gradient g^T @ x.
LAYOUTS = ("forward", "input_grad", "weight_grad")


def _operands(layout: str, rows: int, inner: int, outer: int, gen: torch.Generator):
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(outer, inner, generator=gen)
    grad = torch.randn(rows, outer, generator=gen)
    if layout == "forward":
        return x, weight.t()
    if layout == "input_grad":
        return grad, weight
    return grad.t(), x


def test_a_cpu_with_avx512_or_avx2_and_a_compiler_runs_the_native_kernel():
    """Where it can be built and is not turned off, it runs (a failed build would silently cost
    the layer its speed)."""
    if kernel_isa() is not None and shutil.which("c++") and os.environ.get("MOEKIT_NATIVE", "1") != "0":
        assert native_available()


@pytest.mark.parametrize(
    ("capability", "isa"),
    [("AVX512", "avx512"), ("AVX512_BF16", "avx512"), ("AVX2", "avx2"), ("DEFAULT", None), ("NO AVX", None)],
)
def test_the_kernel_is_built_for_the_widest_vector_set_of_the_cpu(monkeypatch, capability, isa):
    """The vector set (and with it the register tile) follows the CPU's features; each set gets
    a build of its own, never one compiled for another CPU; without either only the at::mm loops
    are built (no vector flags)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("MOEKIT_NATIVE_ISA", raising=False)
    assert kernel_isa() == isa
    if isa is not None:
        assert native.ISA_FLAGS[isa][0] in native.compile_flags(isa)
    else:
        assert native.compile_flags(isa) == native.COMPILE_FLAGS
    names = {extension_name(isa) for isa in ("avx512", "avx2", "avx512-emulated", None)}
    assert len(names) == 4


def test_the_build_name_hashes_every_source_file_the_kernels_include():
    """A build is reused by its name, a hash of SOURCES and HEADERS: a file left out of them could
    change while an old build, compiled from its old text, went on loading."""
    hashed = {path.name for path in (*native.SOURCES, *native.HEADERS)}
    on_disk = {path.name for path in native.CSRC.iterdir() if path.suffix in (".cpp", ".h")}
    assert on_disk == hashed


@pytest.mark.parametrize(
    ("capability", "requested", "isa"),
    [
        ("AVX512", "other", "avx2"),
        ("AVX512", "avx2", "avx2"),
        ("AVX512", "avx512-emulated", "avx512-emulated"),
        ("AVX2", "other", "avx512-emulated"),
        ("AVX2", "AVX512-Emulated ", "avx512-emulated"),
        ("AVX2", "avx2", "avx2"),
        ("DEFAULT", "other", None),
        ("DEFAULT", "avx512-emulated", None),
    ],
)
def test_moekit_native_isa_builds_another_vector_set_the_cpu_runs(monkeypatch, capability, requested, isa):
    """`MOEKIT_NATIVE_ISA` (for tests: `make test` runs the kernel tests again with `other`) picks
    a vector set the CPU can run: AVX2 on an AVX-512 CPU, the AVX-512 code on its emulation on
    either; without AVX2 there is no tile kernel to build."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("MOEKIT_NATIVE_ISA", requested)
    assert kernel_isa() == isa


@pytest.mark.parametrize(
    ("capability", "requested"), [("AVX2", "avx512"), ("AVX2", "sse4"), ("AVX512", "neon")]
)
def test_a_vector_set_the_cpu_cannot_run_is_refused_with_a_warning(monkeypatch, capability, requested):
    """Built for AVX-512 on a CPU without it, the kernel would stop the process at its first
    instruction: the request is named in a warning and the CPU's own set is built."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("MOEKIT_NATIVE_ISA", requested)
    with pytest.warns(RuntimeWarning, match=f"MOEKIT_NATIVE_ISA='{requested}' ignored"):
        assert kernel_isa() == native.cpu_isa()


def test_the_other_vector_sets_kernel_compiles_here():
    """A machine builds the kernel for its own vector set, and an AVX2 one runs the AVX-512 code
    only on an emulation of its intrinsics (the other vector set's leg of `make test`), so a change
    that breaks the other set's real build (its intrinsics' calls and types) would first show on a
    machine of the other kind: the kernels' main source is compiled for that set here, syntax and
    types only."""
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (`c++`) on PATH, which the native kernels also need")
    other = "avx2" if native.cpu_isa() == "avx512" else "avx512"
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [
        compiler, "-fsyntax-only", "-std=c++20", *native.compile_flags(other),
        *(f"-I{path}" for path in includes), str(native.CSRC / "expert_gemm.cpp"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"the {other} build does not compile:\n{result.stderr[-3000:]}"


@needs_tile_kernel
@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(LAYOUTS),
    st.integers(0, 20),
    st.integers(0, 600),
    st.integers(0, 140),
    st.integers(0, 3),
    st.sampled_from(["none", "dense", "transposed", "strided"]),
    st.integers(0, 2**16),
)
def test_products_match_float64_and_touch_only_their_output(layout, rows, inner, outer, pad, prefetch, seed):
    """Every row and column tail (tiles of 6 rows x 64 or 16 columns, inner blocks of 512 and a
    second block past them, packed weight panels), including empty operands, into a view of a
    larger buffer whose other entries stay as they were; with or without memory to prefetch (a
    strided view is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _operands(layout, rows, inner, outer, gen)
    upcoming = {
        "none": None,
        "dense": torch.randn(37, 50),
        "transposed": torch.randn(50, 37).t(),
        "strided": torch.randn(40, 40)[::3, ::2],
    }[prefetch]
    buffer = torch.full((a.shape[0] + 2 * pad, b.shape[1] + pad), float("nan"))
    out = buffer[pad : pad + a.shape[0], : b.shape[1]]
    mm_into(a, b, out, upcoming)
    expected = a.double() @ b.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4 * max(1.0, inner**0.5))
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[pad : pad + a.shape[0], : b.shape[1]] = False
    assert torch.isnan(buffer[untouched]).all()


@needs_tile_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("rows", "inner", "outer"),
    [
        (300, 70, 260),
        (257, 33, 700),
        (20, 300, 300),
        (7, 129, 1),
        (40, 5, 13),
        (1100, 520, 40),
        (13, 1030, 70),
        (520, 4200, 7),
    ],
)
def test_copied_operands_over_many_blocks_match_float64(layout, rows, inner, outer):
    """The operands the kernel copies before its tiles read them: the weight gradient's A (g^T:
    its columns contiguous), packed by blocks of rows per block of k (512 deep), and its B, copied
    into panels by chunks of 2 MB (4,200 columns 512 deep: five chunks); the input gradient's B
    (W read in place), copied into panels by chunks of columns per block of k; the forward's W^T
    packed by panels; several blocks of each (inner and rows past 1024) and their tails, into a
    view of a larger buffer whose other entries stay as they were."""
    gen = torch.Generator().manual_seed(rows + outer)
    a, b = _operands(layout, rows, inner, outer, gen)
    buffer = torch.full((a.shape[0] + 2, b.shape[1] + 3), float("nan"))
    out = buffer[1 : a.shape[0] + 1, 2 : b.shape[1] + 2]
    mm_into(a, b, out)
    atol = 1e-4 * a.shape[1] ** 0.5
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-5, atol=atol)
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[1 : a.shape[0] + 1, 2 : b.shape[1] + 2] = False
    assert torch.isnan(buffer[untouched]).all()


@needs_tile_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset", [0, 1])
def test_weight_gradients_stored_past_the_caches_match_float64(threads, offset):
    """Weight gradients written in one pass into rows of whole 64-byte lines (offset 0, 64 columns)
    are stored past the caches; an expert with more rows than a block of k (700), or rows that do
    not start on a line (offset 1), is stored as usual. Every expert's gradient against float64,
    the input gradients too, and the slice of an expert without rows keeps what was there."""
    backward_pairs = loop_op("expert_backward_pairs", "tile")
    gen = torch.Generator().manual_seed(11 + offset)
    n_out, n_in, counts = 40, 64, [100, 700, 0, 5]
    num_experts, rows = len(counts), sum(counts)
    weights = torch.randn(num_experts, n_out, n_in, generator=gen) * 0.2
    x = torch.randn(rows, n_in, generator=gen)
    grad = torch.randn(rows, n_out, generator=gen)
    storage = torch.full((num_experts * n_out * n_in + offset,), float("nan"))
    grad_weight = storage[offset:].view(num_experts, n_out, n_in)
    grad_in = torch.full((rows, n_in), float("nan"))
    starts = [sum(counts[:e]) for e in range(num_experts)]
    tasks = [(e, starts[e], starts[e] + c) for e, c in enumerate(counts) if c]
    with torch_threads(threads):
        backward_pairs(grad, x, weights, grad_weight, grad_in, torch.tensor(tasks).reshape(-1, 3), threads)
    close = dict(rtol=1e-5, atol=1e-4 * 700**0.5)
    for e, start, stop in tasks:
        span = slice(start, stop)
        torch.testing.assert_close(grad_weight[e].double(), grad[span].double().T @ x[span].double(), **close)
        torch.testing.assert_close(grad_in[span].double(), grad[span].double() @ weights[e].double(), **close)
    assert torch.isnan(grad_weight[2]).all()


@needs_tile_kernel
def test_bad_operands_get_a_clear_error():
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="float32"):
        mm_into(a.double(), b.double(), torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not match"):
        mm_into(a, b, torch.empty(5, 5))
    with pytest.raises(RuntimeError, match="unit column stride"):
        mm_into(a, b, torch.empty(5, 4).t())
    with pytest.raises(RuntimeError, match="unit stride along one dimension"):
        mm_into(a, torch.randn(16, 10)[::2, ::2], torch.empty(4, 5))


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_plans_take_the_tile_kernel_for_float32_only(dtype, monkeypatch):
    """fp32 takes the kernel chosen for this CPU (forced here), other dtypes torch's at::mm, and
    so do weights without a unit stride; `MOEKIT_NATIVE=0` turns the loops off."""
    num_experts, hidden, ff = 4, 16, 8
    act = make_activation("swiglu")
    x = torch.randn(64, hidden).to(dtype)
    token = torch.arange(64).repeat_interleave(2)
    expert = torch.arange(128) % num_experts
    order = torch.argsort(expert, stable=True)
    w_in = torch.randn(num_experts, act.in_features(ff), hidden).to(dtype)
    w_out = torch.randn(num_experts, hidden, ff).to(dtype)
    for forced in ("tile", "mm"):
        monkeypatch.setenv("MOEKIT_NATIVE", forced)
        tile = forced == "tile" and dtype == torch.float32 and native_available()
        plan = plan_experts(x, token[order], expert[order], w_in, w_out, act, backend="loop")
        assert plan.loops.kernel == ("tile" if tile else "mm")
        assert expert_kernel(x.float(), torch.randn(num_experts, 16, 16)[:, ::2, ::2]) == "mm"
    assert expert_kernel(x.long(), w_in.long()) is None
    monkeypatch.setenv("MOEKIT_NATIVE", "0")
    assert (
        expert_kernel(x, w_in, w_out) is None
        and plan_experts(x, token, expert, w_in, w_out, act).path == "portable"
    )


@st.composite
def expert_tasks(draw):
    """Packed weights [E, n_out, n_in] (row-major, transposed in memory, or every other element of
    a larger tensor: no unit stride), rows, and tasks: some experts' row ranges in any order, some
    experts and rows left out."""
    num_experts = draw(st.integers(1, 5))
    n_out, n_in = draw(st.integers(1, 90)), draw(st.integers(1, 300))
    counts = draw(st.lists(st.integers(0, 14), min_size=num_experts, max_size=num_experts))
    included = draw(st.lists(st.booleans(), min_size=num_experts, max_size=num_experts))
    layout = draw(st.sampled_from(["row_major", "transposed", "strided"]))
    threads = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tasks, start = [], 0
    for e in draw(st.permutations(range(num_experts))):
        if included[e]:
            tasks.append((e, start, start + counts[e]))
        start += counts[e] + draw(st.integers(0, 2))  # rows between experts: never written
    return num_experts, n_out, n_in, start, tasks, layout, threads, dtype, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("kernel", ["tile", "mm"])
@settings(max_examples=40, deadline=None)
@given(case=expert_tasks())
def test_expert_loops_match_float64_and_write_only_their_rows(kernel, case):
    """`expert_products` and `expert_backward_pairs` (every expert whole on one of the threads) on
    either kernel (the tile kernel in fp32; in fp32 and float64 the mm kernel's BLAS calls, and
    at::mm for weights without a unit stride): each task's rows against float64, the weight
    gradients of its experts; rows and experts of no task keep what was there."""
    num_experts, n_out, n_in, rows, tasks, layout, threads, dtype, seed = case
    products, backward_pairs = loop_op("expert_products", kernel), loop_op("expert_backward_pairs", kernel)
    if kernel == "tile":  # fp32, and (as plans give it) weights with a unit stride
        dtype = torch.float32
        layout = "row_major" if layout == "strided" else layout
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_experts, n_out, n_in, generator=gen) * 0.2
    if layout == "transposed":
        weights = weights.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        weights = torch.zeros(num_experts, 2 * n_out, 2 * n_in)[:, ::2, ::2].copy_(weights)
    x = torch.randn(rows, n_in, generator=gen)
    grad = torch.randn(rows, n_out, generator=gen)
    weights, x, grad = weights.to(dtype), x.to(dtype), grad.to(dtype)
    task_tensor = torch.tensor(tasks, dtype=torch.long).reshape(-1, 3)
    out = torch.full((rows, n_out), float("nan"), dtype=dtype)
    grad_in = torch.full((rows, n_in), float("nan"), dtype=dtype)
    grad_weight = torch.full((num_experts, n_out, n_in), float("nan"), dtype=dtype)
    with torch_threads(threads):
        products(x, weights, out, task_tensor, threads)
        backward_pairs(grad, x, weights, grad_weight, grad_in, task_tensor, threads)
    written_rows = torch.zeros(rows, dtype=torch.bool)
    close = dict(rtol=1e-5, atol=1e-4 * max(1.0, n_in**0.5))
    for e, start, stop in tasks:
        w = weights[e].double()
        span = slice(start, stop)
        torch.testing.assert_close(out[span].double(), x[span].double() @ w.T, **close)
        torch.testing.assert_close(grad_in[span].double(), grad[span].double() @ w, **close)
        torch.testing.assert_close(grad_weight[e].double(), grad[span].double().T @ x[span].double(), **close)
        written_rows[span] = True
    assert torch.isnan(out[~written_rows]).all() and torch.isnan(grad_in[~written_rows]).all()
    untouched = sorted(set(range(num_experts)) - {e for e, _, _ in tasks})
    assert torch.isnan(grad_weight[untouched]).all()


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_mm_loops_compute_as_torch_mm_under_its_fp32_precision_setting(precision):
    """The mm kernel's fp32 products (BLAS called directly) are torch.mm's bit for bit, and where
    the user allowed reduced-precision fp32 products ("medium": oneDNN in bf16 where the CPU has
    it) they take at::mm, so that the setting reaches the experts as it reaches torch.mm."""
    products = loop_op("expert_products", "mm")
    gen = torch.Generator().manual_seed(0)
    weights, x = torch.randn(3, 40, 96, generator=gen), torch.randn(70, 96, generator=gen)
    tasks = torch.tensor([[2, 0, 30], [0, 30, 70]])
    out = torch.empty(70, 40)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        with torch_threads(1):
            products(x, weights, out, tasks, 1)
            expected = torch.cat([x[:30] @ weights[2].t(), x[30:] @ weights[0].t()])
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kernel", ["tile", "mm"])
def test_bad_expert_tasks_get_a_clear_error(kernel):
    products = loop_op("expert_products", kernel)
    weights, x = torch.randn(2, 4, 8), torch.randn(5, 8)
    out = torch.empty(5, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        products(x, weights, out, torch.tensor([[2, 0, 5]]), 1)
    with pytest.raises(RuntimeError, match="out of range"):
        products(x, weights, out, torch.tensor([[0, 3, 6]]), 1)
    with pytest.raises(RuntimeError, match="int64 CPU tensor"):
        products(x, weights, out, torch.tensor([0, 0, 5]), 1)
    with pytest.raises(RuntimeError, match="must be"):
        products(x, weights.double(), out, torch.tensor([[0, 0, 5]]), 1)


def _swiglu_float64(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@needs_tile_kernel
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20), st.integers(1, 70), st.sampled_from([1.0, 30.0]), st.integers(0, 2**16))
def test_swiglu_and_its_derivative_match_float64(rows, ff, scale, seed):
    """Column tails of 16, and gates far into both saturated ends of the sigmoid (scale 30)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 2 * ff, generator=gen) * scale
    grad = torch.randn(rows, ff, generator=gen)
    act = make_activation("swiglu")
    assert swiglu_fits(h)
    exact = h.double().requires_grad_()
    expected = _swiglu_float64(exact)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad.double()) if rows else (exact * 0,)
    torch.testing.assert_close(act.forward(h).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act.backward(h, grad).double(), expected_grad, rtol=1e-4, atol=1e-4)


@needs_tile_kernel
def test_forcing_the_mm_expert_kernel_leaves_swiglu_and_dense_rows_on_the_native_ops(monkeypatch):
    """`MOEKIT_NATIVE=mm` forces only the experts' products: a dense SwiGLU and a decoding step's
    dense rows keep the native ops (the same bits as with the choice left to moekit), and only
    `MOEKIT_NATIVE=0` turns those off."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(33, 2 * 40, generator=gen)
    x, weight = torch.randn(1, 512, generator=gen), torch.randn(4096, 512, generator=gen)
    act = make_activation("swiglu")
    outs, native_ops = {}, {}
    for setting in ("auto", "mm", "0"):
        monkeypatch.setenv("MOEKIT_NATIVE", setting)
        outs[setting] = act.forward(h)
        native_ops[setting] = (swiglu_fits(h), rows_linear.fits(x, weight, None))
    assert native_ops == {"auto": (True, True), "mm": (True, True), "0": (False, False)}
    assert torch.equal(outs["mm"], outs["auto"])


@needs_tile_kernel
def test_swiglu_split_over_the_threads_and_under_autograd_matches_float64():
    """Inputs large enough to be split over torch's threads (more than 2^16 elements), and
    `swiglu_with_grad`, which dense layers differentiate through, against autograd in float64."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3001, 2 * 40, generator=gen)
    assert h.numel() >= 1 << 16
    grad = torch.randn(3001, 40, generator=gen)
    leaf = h.clone().requires_grad_()
    assert not swiglu_fits(leaf)  # autograd would not see the native op: it must not run there
    with torch_threads(2):
        out = swiglu_with_grad(leaf)
        (got,) = torch.autograd.grad(out, leaf, grad)
    exact = h.double().requires_grad_()
    expected = _swiglu_float64(exact)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), expected_grad, rtol=1e-4, atol=1e-4)


@needs_tile_kernel
def test_a_dense_ffn_differentiates_through_the_swiglu_kernel():
    """moekit's dense FFN trains through `swiglu_with_grad` (one native pass each way, where torch's
    ops read h's halves as strided views): its autograd graph holds that node, and its output and
    gradients match the same layer in float64 on torch's ops."""
    torch.manual_seed(4)
    hidden, ff = 24, 40
    module = DenseFFN(hidden, ff)
    x = torch.randn(300, hidden, requires_grad=True)
    grad = torch.randn(300, hidden)
    out = module(x)
    assert "_SwiGLUFunctionBackward" in autograd_node_names(out)
    got = torch.autograd.grad(out, [x, module.proj_in.weight, module.proj_out.weight], grad)
    x64 = x.detach().double().requires_grad_()
    weights = (module.proj_in.weight, module.proj_out.weight)
    w_in, w_out = (w.detach().double().requires_grad_() for w in weights)
    gate, up = (x64 @ w_in.T).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ w_out.T
    expected_grads = torch.autograd.grad(expected, [x64, w_in, w_out], grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


@needs_loops
def test_the_kernels_parallel_loops_run_on_torchs_threads():
    """Built without OpenMP, ATen's parallel_for runs serially and the expert loops take every
    expert on one thread (1.6-1.8x slower on a quiet 2-core machine, BENCHMARKS.md §13)."""
    with torch_threads(2):
        assert torch.ops.moekit.parallel_width(2) == 2
        assert torch.ops.moekit.parallel_width(1) == 1
    with torch_threads(1):
        assert torch.ops.moekit.parallel_width(2) == 1


def routed_swiglu_experts(gen: torch.Generator, num_experts: int, hidden: int, ff: int, tokens: int, k: int):
    """(x, token, expert, weight, w_in, w_out): tokens' k random choices sorted by expert, their
    routing weights, and SwiGLU experts' packed weights."""
    x = torch.randn(tokens, hidden, generator=gen)
    expert = torch.randint(0, num_experts, (tokens * k,), generator=gen)
    order = torch.argsort(expert, stable=True)
    token, expert = torch.arange(tokens).repeat_interleave(k)[order], expert[order]
    weight = torch.rand(tokens * k, generator=gen)
    w_in = torch.randn(num_experts, 2 * ff, hidden, generator=gen) * 0.2
    w_out = torch.randn(num_experts, hidden, ff, generator=gen) * 0.2
    return x, token, expert, weight, w_in, w_out


@pytest.mark.parametrize("kernel", ["tile", "mm"])
@pytest.mark.parametrize("weight_on", ["output", "input"])
def test_native_experts_give_the_same_bits_on_one_thread_and_two(kernel, weight_on, monkeypatch):
    """The layer's many-token path (experts taken whole by torch's threads: SwiGLU whole in one
    call with the routing weight on the output, else product by product): each expert is computed
    by one thread in one way, so the thread count changes no bit of the outputs or gradients."""
    loop_op("expert_products", kernel)  # skips where the kernel does not run
    monkeypatch.setenv("MOEKIT_NATIVE", kernel)
    gen = torch.Generator().manual_seed(3)
    tokens, hidden = 96, 32
    act = make_activation("swiglu")
    x, token, expert, weight, w_in, w_out = routed_swiglu_experts(gen, 6, hidden, 24, tokens, 2)
    upstream = torch.randn(tokens, hidden, generator=gen)
    results = []
    for threads in (1, 2):
        leaves = [t.clone().requires_grad_() for t in (x, weight, w_in, w_out)]
        with torch_threads(threads):
            plan = plan_experts(leaves[0], token, expert, leaves[2], leaves[3], act, weight_on, threads=2)
            assert plan.loops.kernel == kernel and plan.loops.threads == 2
            y = grouped_experts(
                leaves[0],
                token,
                expert,
                leaves[1],
                leaves[2],
                leaves[3],
                None,
                None,
                act,
                weight_on,
                threads=2,
            )
            y.backward(upstream)
        results.append([y.detach(), *(leaf.grad for leaf in leaves)])
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("kernel", ["tile", "mm"])
def test_swiglu_experts_read_in_place_over_several_blocks_match_float64(kernel, monkeypatch):
    """The tile kernel reads each expert's rows of x and grad_out where they lie, through their
    token ids (no gathered copy): as the rows of the forward's and the input gradient's products,
    as the packed columns of w_out's gradient and as the copied rows of w_in's. Here hidden and
    one expert's rows span two blocks of k (512), tokens come in any order, and other experts have
    a few rows (the dot products of decode), 7 rows (a register tile and one row more) or none:
    output and every gradient against the same layer in float64."""
    loop_op("expert_swiglu_forward", kernel)  # skips where the kernel does not run
    monkeypatch.setenv("MOEKIT_NATIVE", kernel)
    gen = torch.Generator().manual_seed(11)
    num_tokens, hidden, ff = 600, 520, 20
    counts = torch.tensor([530, 3, 7, 0, 1])
    expert = torch.repeat_interleave(torch.arange(len(counts)), counts)
    token = torch.cat([torch.randperm(num_tokens, generator=gen)[:c] for c in counts.tolist()])
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    weight = torch.rand(len(token), generator=gen, dtype=torch.float64)
    w_in = torch.randn(len(counts), 2 * ff, hidden, generator=gen, dtype=torch.float64) * hidden**-0.5
    w_out = torch.randn(len(counts), hidden, ff, generator=gen, dtype=torch.float64) * ff**-0.5
    upstream = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    act = make_activation("swiglu")

    def exact(x, weight, w_in, w_out):
        h = torch.einsum("rd,rfd->rf", x[token], w_in[expert])
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up * weight[:, None]
        return torch.zeros_like(x).index_add(0, token, torch.einsum("rf,rdf->rd", a, w_out[expert]))

    def moekit_layer(x, weight, w_in, w_out):
        plan = plan_experts(x, token, expert, w_in, w_out, act, "output", threads=2)
        assert plan.loops.kernel == kernel and plan.loops.whole_swiglu
        return grouped_experts(x, token, expert, weight, w_in, w_out, None, None, act, threads=2)

    def output_and_grads(layer, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, w_in, w_out)]
        with torch_threads(2):
            y = layer(*leaves)
            y.backward(upstream.to(dtype))
        return [y.detach(), *(leaf.grad for leaf in leaves)]

    fast, want = output_and_grads(moekit_layer, torch.float32), output_and_grads(exact, torch.float64)
    for got, expected in zip(fast, want, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(fast[3][3]) == 0 and torch.count_nonzero(fast[4][3]) == 0


@pytest.mark.parametrize("kernel", ["tile", "mm"])
def test_experts_outside_autograd_keep_no_h_and_give_the_same_bits(kernel, monkeypatch):
    """Under no_grad the SwiGLU forward call gets no h to keep (it stays in the call's work space):
    the output has the bits of the autograd forward, which keeps h for the backward, and the op
    called with and without an h writes the same rows."""
    forward = loop_op("expert_swiglu_forward", kernel)
    monkeypatch.setenv("MOEKIT_NATIVE", kernel)
    gen = torch.Generator().manual_seed(5)
    hidden, ff, tokens, k = 40, 24, 70, 2
    act = make_activation("swiglu")
    x, token, expert, weight, w_in, w_out = routed_swiglu_experts(gen, 5, hidden, ff, tokens, k)
    kept = []
    original = NativeLoops.swiglu_forward

    def spy(self, x, scale, w_in, w_out, h, ys):
        kept.append(h)
        return original(self, x, scale, w_in, w_out, h, ys)

    monkeypatch.setattr(NativeLoops, "swiglu_forward", spy)

    def layer(*leaves):
        return grouped_experts(leaves[0], token, expert, *leaves[1:], None, None, act, threads=2)

    with torch_threads(2):
        with torch.no_grad():
            inference = layer(x, weight, w_in, w_out)
        training = layer(*(t.clone().requires_grad_() for t in (x, weight, w_in, w_out)))
    assert kept[0] is None and kept[1].shape == (tokens * k, 2 * ff)
    assert torch.equal(inference, training.detach())

    groups = plan_experts(x, token, expert, w_in, w_out, act).groups
    h = torch.full((tokens * k, 2 * ff), float("nan"))
    with_h, without_h = (torch.full((tokens * k, hidden), float("nan")) for _ in range(2))
    forward(x, token, weight, w_in, w_out, h, with_h, groups.tasks, 2)
    forward(x, token, weight, w_in, w_out, None, without_h, groups.tasks, 2)
    assert not torch.isnan(h).any() and torch.equal(with_h, without_h)


@pytest.mark.parametrize("kernel", ["tile", "mm"])
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(0, 90), st.integers(0, 2**16))
def test_combine_sums_each_tokens_rows_and_zeroes_tokens_without_any(kernel, num_tokens, cols, rows, seed):
    """`moekit::combine_rows` (the tile path's combine) and `combine_rows_any` (the at::mm path's)
    against float64, tokens with no rows included; one thread or two give the same bits."""
    loop_op("expert_products", kernel)  # skips where the kernel does not run
    combine = torch.ops.moekit.combine_rows if kernel == "tile" else torch.ops.moekit.combine_rows_any
    gen = torch.Generator().manual_seed(seed)
    token = torch.randint(0, num_tokens, (rows,), generator=gen)
    values = torch.randn(rows, cols, generator=gen)
    order = torch.argsort(token, stable=True)
    bounds = torch.zeros(num_tokens + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(token, minlength=num_tokens), 0, out=bounds[1:])
    outs = []
    for threads in (1, 2):
        out = torch.full((num_tokens, cols), float("nan"))
        with torch_threads(threads):
            combine(values, order, bounds, out)
        outs.append(out)
    expected = torch.zeros(num_tokens, cols, dtype=torch.float64).index_add_(0, token, values.double())
    torch.testing.assert_close(outs[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="bounds must run from 0 to A"):
        combine(values, order, bounds + 1, torch.empty(num_tokens, cols))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(0, 90), st.integers(0, 2**16))
def test_both_combines_sum_fp32_rows_to_the_same_bits(num_tokens, cols, rows, seed):
    """fp32 rows: the at::mm path's combine sums as the tile path's (combine_rows.h, which also
    requests later tokens' rows), so a layer's output does not depend on which kernel ran."""
    tile = loop_op("combine_rows", "tile")
    loop_op("expert_products", "mm")  # skips where the at::mm loops do not run
    any_dtype = torch.ops.moekit.combine_rows_any
    gen = torch.Generator().manual_seed(seed)
    token = torch.randint(0, num_tokens, (rows,), generator=gen)
    values = torch.randn(rows, cols, generator=gen)
    order = torch.randperm(rows, generator=gen)  # rows anywhere, as the experts' tasks put them
    bounds = torch.zeros(num_tokens + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(token[order], minlength=num_tokens), 0, out=bounds[1:])
    order = order[torch.argsort(token[order], stable=True)]
    outs = [torch.full((num_tokens, cols), float("nan")) for _ in range(2)]
    with torch_threads(2):
        tile(values, order, bounds, outs[0])
        any_dtype(values, order, bounds, outs[1])
    assert torch.equal(outs[0], outs[1])
