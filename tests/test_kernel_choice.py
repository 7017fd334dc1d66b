"""Kernel choices fixed per machine (measured once, stored), recorded and re-applied; the portable
path taken when the native kernels cannot be built warns and stays exact."""

import json
import os
import time
import warnings

import pytest
import torch

from helpers import needs_tile_kernel
from moekit import MoE, MoEConfig, preset
from moekit.dispatch.reference import reference_moe
from moekit.kernels import gemm, native, store
from moekit.kernels import record as record_module
from moekit.kernels.record import apply_kernel_record, kernel_record


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    """An empty kernel store, no forced choice and no waiting for a core; the process's cached
    choices are dropped before and after, so that other tests see this machine's own choice again."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("MOEKIT_GEMM", raising=False)
    # measurements here are undisturbed unless a test says otherwise (other work on the machine,
    # such as the suite's other worker, would otherwise make a quick fake measurement count as
    # disturbed and be taken again)
    monkeypatch.setattr(store, "runqueue_wait_ns", lambda: 0)
    gemm.onednn_is_faster.cache_clear()
    native.stored_float32_kernel.cache_clear()
    yield tmp_path / "kernels"
    gemm.onednn_is_faster.cache_clear()
    native.stored_float32_kernel.cache_clear()


def test_choice_is_measured_once_and_then_read(fresh_kernel_cache):
    calls = []

    def measure():
        calls.append(1)
        return "b"

    assert store.stored_choice("probe", ("a", "b"), measure) == "b"
    # a second process (or call) reads the stored choice, whatever a new measurement would say
    assert store.stored_choice("probe", ("a", "b"), lambda: "a") == "b"
    assert len(calls) == 1
    stored = json.loads(store.choice_path("probe").read_text())
    assert stored == {"machine": store.machine_key(), "choice": "b", "quiet": True}


def test_choice_of_another_machine_or_torch_is_measured_again(fresh_kernel_cache):
    path = store.choice_path("probe")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"machine": {**store.machine_key(), "torch": "0.0"}, "choice": "a"}))
    assert store.stored_choice("probe", ("a", "b"), lambda: "b") == "b"
    path.write_text("not json")
    assert store.stored_choice("probe", ("a", "b"), lambda: "a") == "a"


# /proc/cpuinfo's first block on an AVX2 EPYC (Zen 3) whose VM names it only "AMD EPYC"
ZEN3_CPUINFO = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
    "model name\t: AMD EPYC\nstepping\t: 1\n"
)


def test_cpu_signature_tells_apart_generations_sharing_a_model_name(fresh_kernel_cache, monkeypatch):
    zen4 = ZEN3_CPUINFO.replace("model\t\t: 1\n", "model\t\t: 17\n")
    assert store.cpu_signature(ZEN3_CPUINFO) == "family 25 model 1 stepping 1"
    assert store.cpu_signature(zen4) == "family 25 model 17 stepping 1"
    # the first processor's block decides; a file without the fields gives ""
    assert store.cpu_signature(ZEN3_CPUINFO + "\n" + zen4) == "family 25 model 1 stepping 1"
    assert store.cpu_signature("processor\t: 0\nmodel name\t: some CPU\n") == ""
    # a choice stored on one of them is not read on the other
    monkeypatch.setattr(store, "cpu_signature", lambda: "family 25 model 1 stepping 1")
    assert store.stored_choice("probe", ("a", "b"), lambda: "a") == "a"
    monkeypatch.setattr(store, "cpu_signature", lambda: "family 25 model 17 stepping 1")
    assert store.stored_choice("probe", ("a", "b"), lambda: "b") == "b"


def test_a_disturbed_measurement_is_taken_again_and_load_never_picks_the_winner(
    fresh_kernel_cache, monkeypatch
):
    def waits(*disturbed):
        """runqueue_wait_ns for measurements that were disturbed or not, in turn."""
        values = []
        for flag in disturbed:
            values += [0, 10**12 if flag else 0]  # 1000 s of waiting for a core, or none
        return iter(values).__next__

    results = iter(["b", "a"])
    monkeypatch.setattr(store, "runqueue_wait_ns", waits(True, False))
    # the first measurement (under load) said "b"; the second, quiet, said "a" and is stored
    assert store.stored_choice("probe", ("a", "b"), lambda: next(results)) == "a"
    assert json.loads(store.choice_path("probe").read_text())["quiet"] is True
    store.choice_path("probe").unlink()
    monkeypatch.setattr(store, "runqueue_wait_ns", waits(*[True] * store.MEASURE_ATTEMPTS))
    calls = []
    assert store.stored_choice("probe", ("a", "b"), lambda: calls.append(1) or "b", disturbed="a") == "a"
    assert len(calls) == store.MEASURE_ATTEMPTS
    stored = json.loads(store.choice_path("probe").read_text())
    assert stored["choice"] == "a" and stored["quiet"] is False
    # a process started beside it reads the same choice
    assert store.stored_choice("probe", ("a", "b"), lambda: "b") == "a"


def test_gemm_disturbed_while_measured_takes_mkl(fresh_kernel_cache, monkeypatch):
    if not gemm._onednn_matches_mm(torch.float32):
        pytest.skip("oneDNN's linear op is not usable in this torch build: MKL is the only kernel")
    monkeypatch.setattr(gemm, "_measure_faster", lambda dtype: "onednn")
    waited = iter([0, 10**12] * store.MEASURE_ATTEMPTS)
    monkeypatch.setattr(store, "runqueue_wait_ns", lambda: next(waited))
    assert gemm.gemm_kernel(torch.float32) == "mkl"


def test_runqueue_wait_grows_while_another_process_holds_the_cores():
    import subprocess
    import sys
    import time

    before = store.runqueue_wait_ns()
    if before is None:
        pytest.skip("this kernel does not report schedstat (/proc/self/task/*/schedstat)")
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < 1.0:  # spin: this thread competes with the hogs
            pass
    finally:
        for hog in hogs:
            hog.kill()
    assert store.runqueue_wait_ns() - before > 1e7  # waited at least 10 ms for a core in that second


def test_gemm_kernel_follows_the_store_not_a_new_timing(fresh_kernel_cache, monkeypatch):
    if not gemm._onednn_matches_mm(torch.float32):
        pytest.skip("oneDNN's linear op is not usable in this torch build: MKL is the only kernel")
    monkeypatch.setattr(gemm, "_measure_faster", lambda dtype: "onednn")
    assert gemm.gemm_kernel(torch.float32) == "onednn"
    # a later process whose timing would pick MKL (a busy machine) still takes the stored oneDNN
    gemm.onednn_is_faster.cache_clear()
    monkeypatch.setattr(gemm, "_measure_faster", lambda dtype: "mkl")
    assert gemm.gemm_kernel(torch.float32) == "onednn"
    # MOEKIT_GEMM overrides the store, for all dtypes or per dtype
    for setting, expected in (
        ("mkl", "mkl"),
        ("float32=mkl,bfloat16=onednn", "mkl"),
        ("bfloat16=mkl", "onednn"),
    ):
        monkeypatch.setenv("MOEKIT_GEMM", setting)
        gemm.onednn_is_faster.cache_clear()
        assert gemm.gemm_kernel(torch.float32) == expected, setting


def test_expert_kernel_is_measured_once_per_cpu_model_and_then_read(fresh_kernel_cache, monkeypatch):
    """Where both kernels run (fp32 on AVX-512 or AVX2) the tile kernel or at::mm is chosen by a
    short measurement, stored per CPU model; `MOEKIT_NATIVE` forces either; without the tile kernel
    (neither vector set, or forced off) the choice is at::mm with no measurement."""
    monkeypatch.setenv("MOEKIT_NATIVE", "auto")
    monkeypatch.setattr(native, "native_available", lambda: True)
    calls = []
    monkeypatch.setattr(native, "measure_float32_kernel", lambda: calls.append(1) or "mm")
    assert native.float32_kernel() == "mm"
    monkeypatch.setattr(native, "measure_float32_kernel", lambda: calls.append(1) or "tile")
    assert native.float32_kernel() == "mm" and len(calls) == 1  # read from the store
    stored = json.loads(store.choice_path(native.float32_choice_name(native.kernel_isa())).read_text())
    assert stored == {"machine": store.machine_key(), "choice": "mm", "quiet": True}
    monkeypatch.setenv("MOEKIT_NATIVE", "tile")
    assert native.float32_kernel() == "tile"
    monkeypatch.setattr(native, "native_available", lambda: False)
    assert native.float32_kernel() == "mm" and len(calls) == 1


def test_expert_kernel_is_measured_again_when_the_kernels_change(fresh_kernel_cache, monkeypatch, tmp_path):
    """The stored choice between the tile kernel and at::mm is keyed by the kernels' build: a
    changed kernel source (or another vector set's build) is measured afresh instead of reading a
    choice made against the previous kernel."""
    monkeypatch.setenv("MOEKIT_NATIVE", "auto")
    monkeypatch.setattr(native, "native_available", lambda: True)
    monkeypatch.setattr(native, "kernel_isa", lambda: "avx512")
    source = tmp_path / "expert_gemm.cpp"
    source.write_text("// one version of the tile kernel\n")
    monkeypatch.setattr(native, "SOURCES", (source,))
    monkeypatch.setattr(native, "HEADERS", ())
    calls = []
    monkeypatch.setattr(native, "measure_float32_kernel", lambda: calls.append(1) or "mm")
    assert native.float32_kernel() == "mm" and len(calls) == 1
    native.stored_float32_kernel.cache_clear()
    assert native.float32_kernel() == "mm" and len(calls) == 1  # the same build: read, not measured
    assert native.float32_choice_name("avx2") != native.float32_choice_name("avx512")
    source.write_text("// the next version\n")
    monkeypatch.setattr(native, "measure_float32_kernel", lambda: calls.append(1) or "tile")
    native.stored_float32_kernel.cache_clear()
    assert native.float32_kernel() == "tile" and len(calls) == 2


@needs_tile_kernel
@pytest.mark.parametrize("many_rows", ["mm", "tile"])
def test_decode_takes_the_tile_kernel_whatever_many_rows_take(fresh_kernel_cache, monkeypatch, many_rows):
    """The measured choice is for many rows per expert; decode (a few rows per expert) runs on the
    tile kernel wherever it runs, in the planned path and the few-rows one alike; `MOEKIT_NATIVE`
    forcing a kernel forces it for both."""
    from moekit.dispatch import few_rows
    from moekit.dispatch.grouped import DECODE_ROWS_PER_EXPERT, plan_experts
    from moekit.experts.activations import make_activation

    monkeypatch.setenv("MOEKIT_NATIVE", "auto")
    monkeypatch.setattr(native, "measure_float32_kernel", lambda: many_rows)
    num_experts, hidden, ff = 4, 16, 8
    w_in, w_out = torch.randn(num_experts, 2 * ff, hidden), torch.randn(num_experts, hidden, ff)
    act = make_activation("swiglu")

    def kernel_of(rows_per_expert: int) -> str:
        expert = torch.arange(num_experts).repeat_interleave(rows_per_expert)
        token = torch.arange(len(expert))
        x = torch.randn(len(expert), hidden)
        return plan_experts(x, token, expert, w_in, w_out, act, threads=2).loops.kernel

    decode_rows, many = DECODE_ROWS_PER_EXPERT - 1, 4 * DECODE_ROWS_PER_EXPERT
    assert (kernel_of(decode_rows), kernel_of(many)) == ("tile", many_rows)
    expert = torch.arange(num_experts).repeat_interleave(decode_rows)
    x = torch.randn(2, hidden)
    assert few_rows.few_rows_kernel(x, len(expert), w_in, w_out, whole=True, expert=expert)[0] == "tile"
    monkeypatch.setenv("MOEKIT_NATIVE", "mm")
    assert (kernel_of(decode_rows), kernel_of(many)) == ("mm", "mm")


def test_record_is_reapplied_on_resume(fresh_kernel_cache, monkeypatch):
    if not gemm._onednn_matches_mm(torch.float32):
        pytest.skip("oneDNN's linear op is not usable in this torch build: MKL is the only kernel")
    monkeypatch.setattr(gemm, "_measure_faster", lambda dtype: "mkl")
    monkeypatch.setenv("MOEKIT_NATIVE", "auto")
    threads = torch.get_num_threads()
    record = kernel_record(torch.float32)
    assert record["gemm"] == {"float32": "mkl"} and record["threads"] == threads
    other_loops = "portable" if record["expert_loops"] != "portable" else "mm"
    started_with = {
        **record,
        "gemm": {"float32": "onednn"},
        "threads": threads + 1,
        "expert_loops": other_loops,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "mm" does not run without a compiler
            changed = apply_kernel_record(started_with, torch.float32)
        assert gemm.gemm_kernel(torch.float32) == "onednn"
        assert torch.get_num_threads() == threads + 1
        assert os.environ["MOEKIT_NATIVE"] == ("0" if other_loops == "portable" else "mm")
        assert len(changed) == 3
        now = kernel_record(torch.float32)
        if native.loops_available():
            keys = ("gemm", "threads", "expert_loops")
            assert {k: now[k] for k in keys} == {k: started_with[k] for k in keys}
        assert apply_kernel_record(now, torch.float32) == []  # nothing left to change
    finally:
        torch.set_num_threads(threads)


@needs_tile_kernel
@pytest.mark.parametrize("kernel", ["tile", "mm"])
def test_record_of_another_vector_set_warns(fresh_kernel_cache, monkeypatch, kernel):
    """A run whose kernels were built for another vector set (`MOEKIT_NATIVE_ISA`) rounds its
    SwiGLU differently, on either kernel: resuming it with this process's build is named in a
    warning."""
    monkeypatch.setenv("MOEKIT_NATIVE", kernel)  # (restored after the test, whatever the record sets)
    here = kernel_record(torch.float32)
    assert here["tile_isa"] == native.kernel_isa() and here["expert_loops"] == kernel
    other = "avx2" if here["tile_isa"] != "avx2" else "avx512-emulated"
    record = {**here, "tile_isa": other}
    with pytest.warns(
        RuntimeWarning, match=f"expert kernels were built for {other}, here for {here['tile_isa']}"
    ):
        apply_kernel_record(record, torch.float32)


@needs_tile_kernel
@pytest.mark.parametrize("cpu", ["avx2", "avx512"])
def test_record_of_the_avx512_kernel_suggests_the_setting_only_where_the_cpu_builds_it(
    fresh_kernel_cache, monkeypatch, cpu
):
    """Resuming an AVX-512 run under an AVX2 build warns either way; `MOEKIT_NATIVE_ISA=avx512` is
    suggested only on an AVX-512 CPU: on another, that setting is refused."""
    monkeypatch.setenv("MOEKIT_NATIVE", "tile")
    monkeypatch.setattr(record_module, "kernel_isa", lambda: "avx2")
    monkeypatch.setattr(record_module, "cpu_isa", lambda: cpu)
    record = {**kernel_record(torch.float32), "expert_loops": "tile", "tile_isa": "avx512"}
    with pytest.warns(RuntimeWarning, match="expert kernels were built for avx512, here for avx2") as caught:
        apply_kernel_record(record, torch.float32)
    suggested = any("MOEKIT_NATIVE_ISA=avx512" in str(w.message) for w in caught)
    assert suggested == (cpu == "avx512")


def test_record_of_another_machine_warns(fresh_kernel_cache):
    record = {**kernel_record(torch.float32), "machine": {"cpu": "elsewhere"}}
    with pytest.warns(RuntimeWarning, match="another machine"):
        apply_kernel_record(record, torch.float32)


def test_record_machine_is_compared_by_the_fields_it_has(fresh_kernel_cache):
    here = store.machine_key()
    other_generation = {**here, "cpu_signature": here["cpu_signature"] + " (another generation)"}
    with pytest.warns(RuntimeWarning, match="another machine"):
        apply_kernel_record({**kernel_record(torch.float32), "machine": other_generation}, torch.float32)
    # a record written before the CPU's family/model/stepping were recorded: the same machine
    older = {field: value for field, value in here.items() if field != "cpu_signature"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_kernel_record({**kernel_record(torch.float32), "machine": older}, torch.float32)


# -- fallbacks, against the float64 reference -------------------------------------------------


def small_layer() -> MoE:
    """A small fp32 layer (the worker paths on the fallbacks are checked against float64 over many
    shapes in test_dispatch_properties.py; here: that the process still computes exactly)."""
    layer = MoE(MoEConfig(hidden_size=64, ff_size=128, router=preset("qwen3_moe", 16, 2)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    return layer


def assert_matches_reference(layer: MoE) -> None:
    x = torch.randn(2, 24, 64, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    ref = reference_moe(layer, x_ref, None)
    upstream = torch.randn_like(ref.output)
    (ref.output * upstream).sum().backward()
    x_fast = x.float().requires_grad_()
    y = layer(x_fast)
    (y * upstream.float()).sum().backward()
    torch.testing.assert_close(y.double(), ref.output.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_fast.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-4)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref.params[name].grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.production_threads
def test_failed_native_build_falls_back_with_a_warning(monkeypatch):
    from torch.utils import cpp_extension

    def failing_build(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setenv("MOEKIT_NATIVE", "auto")
    monkeypatch.setattr(cpp_extension, "load", failing_build)
    native._built_and_checked.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the native expert kernels"):
            available = native.loops_available()
        assert not available and not native.native_available()
        layer = small_layer()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # one warning, not one per call
            assert_matches_reference(layer)
    finally:
        native._built_and_checked.cache_clear()


@pytest.mark.production_threads
def test_production_marker_runs_the_cli_paths():
    """Tests marked `production_threads` run what `moekit train` runs on this machine: the C++
    expert loops on two threads, the tile kernel where the CPU has AVX-512 or AVX2."""
    assert torch.get_num_threads() == 2
    if os.environ.get("MOEKIT_NATIVE", "auto") != "0":
        assert native.loops_available()
        assert native.native_available() == (native.kernel_isa() is not None)


@needs_tile_kernel
@pytest.mark.parametrize("slowed", ["", "_mm"])
def test_expert_kernel_measurement_times_the_layers_swiglu_path(monkeypatch, slowed):
    """The first-use measurement times SwiGLU experts' forward and backward as the layer runs them
    (not products alone): the kernel whose SwiGLU ops are slowed loses, whichever it is."""

    def slow(op):
        def wrapped(*args):
            time.sleep(0.02)
            return op(*args)

        return wrapped

    for name in ("expert_swiglu_forward", "expert_swiglu_backward"):
        monkeypatch.setattr(torch.ops.moekit, name + slowed, slow(getattr(torch.ops.moekit, name + slowed)))
    assert native.measure_float32_kernel() == ("tile" if slowed == "_mm" else "mm")
