"""Kernel choices fixed per machine (measured once, stored), recorded and re-applied; the fallbacks
taken when the native kernel or TorchScript is missing warn and stay exact."""

import json
import os
import warnings

import pytest
import torch

from moekit import MoE, MoEConfig, preset
from moekit.dispatch import loops
from moekit.dispatch.reference import reference_moe
from moekit.dispatch.workers import workers_enabled
from moekit.kernels import gemm, native, store
from moekit.kernels.record import apply_kernel_record, kernel_record


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    """An empty kernel store and no forced choice; the process's cached choices are dropped before
    and after, so that other tests see this machine's own choice again."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("MOEKIT_GEMM", raising=False)
    gemm.onednn_is_faster.cache_clear()
    gemm.row_cuts.cache_clear()
    yield tmp_path / "kernels"
    gemm.onednn_is_faster.cache_clear()
    gemm.row_cuts.cache_clear()


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
    assert stored == {"machine": store.machine_key(), "choice": "b"}


def test_choice_of_another_machine_or_torch_is_measured_again(fresh_kernel_cache):
    path = store.choice_path("probe")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"machine": {**store.machine_key(), "torch": "0.0"}, "choice": "a"}))
    assert store.stored_choice("probe", ("a", "b"), lambda: "b") == "b"
    path.write_text("not json")
    assert store.stored_choice("probe", ("a", "b"), lambda: "a") == "a"


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


def test_record_is_reapplied_on_resume(fresh_kernel_cache, monkeypatch):
    if not gemm._onednn_matches_mm(torch.float32):
        pytest.skip("oneDNN's linear op is not usable in this torch build: MKL is the only kernel")
    monkeypatch.setattr(gemm, "_measure_faster", lambda dtype: "mkl")
    monkeypatch.setenv("MOEKIT_LOOPS", "compiled")
    threads = torch.get_num_threads()
    record = kernel_record(torch.float32)
    assert record["gemm"] == {"float32": "mkl"} and record["threads"] == threads
    started_with = {
        **record,
        "gemm": {"float32": "onednn"},
        "threads": threads + 1,
        "loops": "python",
        "workers": None,
    }
    try:
        changed = apply_kernel_record(started_with, torch.float32)
        assert gemm.gemm_kernel(torch.float32) == "onednn"
        assert torch.get_num_threads() == threads + 1 and os.environ["MOEKIT_LOOPS"] == "python"
        assert len(changed) == 3
        now = kernel_record(torch.float32)
        assert {k: now[k] for k in ("gemm", "threads", "loops")} == {
            k: started_with[k] for k in ("gemm", "threads", "loops")
        }
        assert apply_kernel_record(now, torch.float32) == []  # nothing left to change
    finally:
        torch.set_num_threads(threads)


def test_record_of_another_machine_warns(fresh_kernel_cache):
    record = {**kernel_record(torch.float32), "machine": {"cpu": "elsewhere"}}
    with pytest.warns(RuntimeWarning, match="another machine"):
        apply_kernel_record(record, torch.float32)


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

    monkeypatch.setenv("MOEKIT_NATIVE", "1")
    monkeypatch.setattr(cpp_extension, "load", failing_build)
    native._built_and_checked.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the native expert kernel"):
            available = native.native_available()
        if native.kernel_isa() is not None:
            assert not available
        assert workers_enabled()  # the workers still run, on the library kernels
        layer = small_layer()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # one warning, not one per call
            assert_matches_reference(layer)
    finally:
        native._built_and_checked.cache_clear()


@pytest.mark.production_threads
def test_missing_torchscript_falls_back_with_a_warning(monkeypatch):
    def no_script(fn):
        raise RuntimeError("simulated: TorchScript unavailable")

    monkeypatch.setenv("MOEKIT_LOOPS", "compiled")
    monkeypatch.setattr(torch.jit, "script", no_script)
    loops._loops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="TorchScript could not compile"):
            forward, backward = loops.expert_loops()
        assert forward is loops.products_into and backward is loops.backward_pairs_into
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert_matches_reference(small_layer())
    finally:
        loops._loops.cache_clear()


@pytest.mark.production_threads
def test_production_marker_runs_the_cli_paths():
    """Tests marked `production_threads` run what `moekit train` runs on this machine."""
    from moekit.dispatch.workers import openmp_library

    assert torch.get_num_threads() == 2
    if openmp_library() is not None:  # torch built with GNU OpenMP, as the pinned CPU wheel is
        assert workers_enabled()
    wants_native = os.environ.get("MOEKIT_NATIVE", "1") != "0" and native.kernel_isa() is not None
    if wants_native:
        assert native.native_available()
