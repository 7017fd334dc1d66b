"""The layer benchmark's harness: every contender computes the same layer, and the JSON has the
documented shape."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from moekit.bench.layer import SHAPES, contenders_for, run_layer_benchmark
from moekit.bench.machine import cpu_caches, cpu_line
from moekit.cli import main as cli_main
from moekit.kernels.native import kernel_isa
from moekit.kernels.store import cpu_signature


def test_contenders_compute_the_same_moe_layer():
    notes: list[str] = []
    contenders = {c.impl: c for c in contenders_for(SHAPES["very_fine"], ["hf"], notes)}
    x = torch.randn(16, SHAPES["very_fine"].hidden)
    with torch.no_grad():
        ours = contenders["moekit"].run(x)
        for impl in ("hf_eager", "hf_grouped_mm"):
            torch.testing.assert_close(contenders[impl].run(x), ours, rtol=1e-4, atol=1e-5)
        # both dense references compute the same chain, on different GEMM kernels
        contenders["dense_torch"].module.load_state_dict(contenders["dense"].module.state_dict())
        torch.testing.assert_close(
            contenders["dense"].run(x), contenders["dense_torch"].run(x), rtol=1e-4, atol=1e-5
        )


def test_report_shape(tmp_path):
    report = run_layer_benchmark(
        ["very_fine"], [8], ["fwd", "fwd_bwd"], [], repeats=1, warmup=0, progress=lambda _: None
    )
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(report))
    saved = json.loads(path.read_text())
    results = saved["results"]
    round_trip = saved["settings"]["thread_round_trip_us"]
    assert 0 < round_trip["before"] < 1e6 and 0 < round_trip["after"] < 1e6
    assert {r["impl"] for r in results} == {"moekit", "dense", "dense_torch"}
    for r in results:
        assert r["shape"] == "very_fine" and r["tokens"] == 8 and r["mode"] in ("fwd", "fwd_bwd")
        assert r["median_s"] > 0
        if r["impl"] == "dense":
            assert r["ratio_vs_dense"] == 1.0


def _load_benchmark_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


CLOSE = dict(rtol=1e-4, atol=1e-4)


def assert_products(out: dict, rows: dict, w_in, w_out, span=slice(None), into=None) -> None:
    """out holds the six products of `rows[span]` (x, a, grad_y, grad_h) with w_in and w_out;
    the weight gradients in out[...][into] (an expert's slice) or the whole of out[...]."""
    grad_w = {name: out[name] if into is None else out[name][into] for name in ("grad_w_in", "grad_w_out")}
    x, a, grad_y, grad_h = (rows[name][span] for name in ("x", "a", "grad_y", "grad_h"))
    torch.testing.assert_close(out["h"][span], x @ w_in.T, **CLOSE)
    torch.testing.assert_close(out["y"][span], a @ w_out.T, **CLOSE)
    torch.testing.assert_close(out["grad_a"][span], grad_y @ w_out, **CLOSE)
    torch.testing.assert_close(out["grad_x"][span], grad_h @ w_in, **CLOSE)
    torch.testing.assert_close(grad_w["grad_w_out"], grad_y.T @ a, **CLOSE)
    torch.testing.assert_close(grad_w["grad_w_in"], grad_h.T @ x, **CLOSE)


def test_expert_products_benchmark_times_the_layers_products():
    """`benchmarks/expert_products.py` times the layer's own expert GEMMs: every expert's rows
    times its weights, and the weight gradients of exactly its rows; on the layer's own loops, as
    one torch.mm per expert, and as `--caches` times them cold, alike."""
    script = _load_benchmark_script("expert_products")
    case = script.ProductsCase.build("very_fine", tokens=64)
    w_in, w_out = case.layer.experts.w_in.detach(), case.layer.experts.w_out.detach()
    torch_mm = case.torch_mm_loops()
    assert not torch_mm.grouped_mm and not torch_mm.whole_swiglu  # one torch.mm per expert and product
    cold = script.CachedProducts(case, hot_weights=False, hot_rows=False)
    cold.run()
    for out in (case.run_products(), case.run_products(torch_mm), cold.out):
        seen = 0
        for e, start, stop in case.plan.groups.nonempty:
            assert_products(out, case.rows, w_in[e], w_out[e], slice(start, stop), into=e)
            seen += stop - start
        assert seen == 64 * case.shape.top_k
    timings = script.time_shape("very_fine", tokens=64, repeats=1, warmup=0)
    assert set(timings) == {"dense", "moekit", "products", "products_torch_mm"}
    assert min(timings.values()) > 0


@pytest.mark.parametrize("hot_weights, hot_rows", [(True, False), (False, True), (True, True)])
def test_expert_products_caches_keep_only_the_stand_ins_in_use(hot_weights, hot_rows):
    """`--caches`: a hot arm runs every expert's products on the first expert's weights (and
    weight-gradient slice) or on the buffers' first rows, and touches nothing else, so what it
    reads and writes stays in cache; the dense chain's six products are the products."""
    script = _load_benchmark_script("expert_products")
    case = script.ProductsCase.build("very_fine", tokens=64)
    w_in, w_out = case.layer.experts.w_in.detach(), case.layer.experts.w_out.detach()
    arm = script.CachedProducts(case, hot_weights=hot_weights, hot_rows=hot_rows)
    for t in arm.out.values():
        t.fill_(float("nan"))
    arm.run()
    nonempty = case.plan.groups.nonempty
    first, (last, start, stop) = nonempty[0][0], nonempty[-1]
    e = first if hot_weights else last
    span = slice(0, stop - start) if hot_rows else slice(start, stop)
    assert_products(arm.out, case.rows, w_in[e], w_out[e], span, into=e)  # the last expert's, in place
    written_experts = {first} if hot_weights else {expert for expert, _, _ in nonempty}
    untouched = [x for x in range(case.shape.num_experts) if x not in written_experts]
    assert torch.isnan(arm.out["grad_w_in"][untouched]).all()
    longest = max(end - begin for _, begin, end in nonempty)
    rows_written = longest if hot_rows else len(case.plan.groups.token)
    assert (
        torch.isnan(arm.out["h"][rows_written:]).all() and not torch.isnan(arm.out["h"][:rows_written]).any()
    )
    dense = script.DenseProducts(case.shape, tokens=16)
    dense.run()
    assert_products(dense.out, dense.rows, dense.w_in, dense.w_out)


def test_report_records_cpu_dispatch_and_decode_against_weight_reads():
    report = run_layer_benchmark(
        ["very_fine"], [8], ["fwd"], [], repeats=1, warmup=0, progress=lambda _: None
    )
    cpu = report["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1 and cpu["torch_threads"] == torch.get_num_threads()
    assert set(cpu["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert cpu["signature"] == cpu_signature() and isinstance(cpu["caches"], dict)
    assert cpu_line(cpu).startswith(", ".join(part for part in (cpu["model"], cpu["signature"]) if part))
    (choice,) = report["dispatch"]
    shape = SHAPES["very_fine"]
    per_expert = 3 * shape.hidden * shape.ff * 4  # SwiGLU: w_in [2 ff, d] and w_out [d, ff], fp32
    assert 1 <= choice["active_experts"] <= min(shape.num_experts, 8 * shape.top_k)
    assert choice["active_weight_bytes"] == choice["active_experts"] * per_expert
    assert choice["native_isa"] == (kernel_isa() if choice["kernel"] == "tile" else None)
    bandwidth = report["settings"]["memory_read_bytes_per_s"]
    assert 1e8 < bandwidth < 1e13
    for row in report["results"]:
        limit = choice["active_weight_bytes"] / bandwidth
        expected = row["median_s"] / limit
        assert abs(row["ratio_vs_weight_reads"] - expected) < 1e-9 * expected


def test_busy_core_runs_a_background_process_and_stops_it():
    import os

    from moekit.bench.machine import busy_core

    with busy_core() as pid:
        os.kill(pid, 0)  # alive while the block runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    # a reaped child's pid may be reused by an unrelated process: then it is not our child any more
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"getppid" not in f.read()


def test_cpu_caches_and_line_name_the_cpu_generation(tmp_path):
    for index, (level, kind, size) in enumerate(
        [
            ("1", "Data", "32K"),
            ("1", "Instruction", "32K"),
            ("2", "Unified", "512K"),
            ("3", "Unified", "32768K"),
        ]
    ):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")
    caches = cpu_caches(tmp_path)
    assert caches == {"L1d": "32K", "L1i": "32K", "L2": "512K", "L3": "32768K"}
    assert cpu_caches(tmp_path / "absent") == {}
    cpu = dict(
        model="AMD EPYC",
        signature="family 25 model 1 stepping 1",
        flags=dict(avx2=True, avx512f=False),
        caches=caches,
        cores=2,
        torch_threads=2,
    )
    assert cpu_line(cpu) == (
        "AMD EPYC, family 25 model 1 stepping 1 (avx2; L1d 32K, L2 512K, L3 32768K; 2 cores, 2 torch threads)"
    )


def _rows(shape: str, field: str = "ratio_vs_dense", **by_impl: float) -> list[dict]:
    return [dict(shape=shape, impl=impl, **{field: ratio}) for impl, ratio in by_impl.items()]


def test_dispatch_goals_are_judged_on_the_median_of_the_runs():
    goals = _load_benchmark_script("dispatch_goals")
    quiet = [
        {"results": _rows("fine", moekit=r, dense=1.0) + _rows("coarse", moekit=c, dense=1.0)}
        for r, c in ((1.08, 1.12), (1.13, 1.09), (1.09, 1.11))
    ]
    busy = [
        {"results": _rows("fine", moekit=0.97, dense=1.0, dense_torch=0.9, hf_grouped_mm=2.8)},
        {"results": _rows("fine", moekit=0.99, dense=1.0, dense_torch=0.95, hf_grouped_mm=2.6)},
        {"results": _rows("very_fine", moekit=1.2, dense=1.0, hf_grouped_mm=1.1)},
    ]
    decode = [{"results": _rows("fine", "ratio_vs_weight_reads", moekit=r)} for r in (1.7, 1.6, 2.0)]
    result = goals.verdicts(quiet, busy, decode)
    # one run over the goal does not fail it, a median over it does
    assert result["quiet"]["fine"]["met"] and result["quiet"]["fine"]["median"] == 1.09
    assert not result["quiet"]["coarse"]["met"] and result["quiet"]["coarse"]["median"] == 1.11
    # busy: faster than every peer (a dense reference is not a peer) and within the limit
    assert result["busy"]["fine"]["met"] and result["busy"]["fine"]["best_peer"] == ("hf_grouped_mm", 2.7)
    assert not result["busy"]["very_fine"]["met"]  # a peer was faster
    assert result["decode"]["fine"]["median"] == 1.7
    assert not result["met"]
    assert "| coarse | 1.11x (1.12, 1.09, 1.11) | 1.10x | no |" in goals.format_verdicts(result)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["layer", "--tokens", "0"], "--tokens: got 0, expected an integer >= 1"),
        (["layer", "--tokens", "8", "-5"], "--tokens: got -5"),
        (["layer", "--repeats", "0"], "--repeats: got 0"),
        (["layer", "--warmup", "-1"], "--warmup: got -1, expected an integer >= 0"),
        (["hf", "--batch", "-1"], "--batch: got -1"),
        (["hf", "--hidden", "0"], "--hidden: got 0"),
        (["hf", "--hidden", "12"], "--hidden: got 12, expected a multiple of 8"),
        (["hf", "--experts", "0"], "--experts: got 0"),
        (["hf", "--top-k", "9", "--experts", "4"], "--top-k: got 9, expected at most --experts (4)"),
        (["hf", "--repeats", "0"], "--repeats: got 0"),
    ],
)
def test_bench_rejects_counts_it_cannot_run_before_any_work(argv, message, capsys, monkeypatch):
    from moekit.bench import hf, layer

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started before its arguments were checked")

    monkeypatch.setattr(layer, "run_layer_benchmark", no_work)
    monkeypatch.setattr(hf, "run_hf_benchmark", no_work)
    assert cli_main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
