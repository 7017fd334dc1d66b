"""Why the three-path rewrite of the dispatch (commit 940289f) was slower, isolated in one process.

Times, in alternating rounds (medians): one expert's products on MKL, oneDNN and moekit's tile
kernel, on one thread and two; and the grouped SwiGLU experts' fwd+bwd at T=2048 in this
checkout's dispatch, in the rewrite's C++ path (its source taken from git, built under the op
namespace `moekit_rw`; `RW_FLAGS=-fopenmp RW_NAME=moekit_rw_omp` builds it as it should have been)
and in the dense reference, with each thread's on-CPU time and run-queue wait per step (Linux).

    ROUNDS=5 python benchmarks/rewrite_isolation.py coarse fine very_fine
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
from moekit.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from moekit.bench.layer import SHAPES, build_layer, shape_input  # noqa: E402
from moekit.bench.peers import DenseEquivalent  # noqa: E402
from moekit.dispatch.grouped import grouped_experts, plan_experts  # noqa: E402
from moekit.kernels.gemm import _onednn_linear  # noqa: E402
from moekit.kernels.native import native_available  # noqa: E402

assert native_available()
SRC = os.path.join(tempfile.gettempdir(), "moekit_rewrite_isolation", "expert_gemm_rw.cpp")
os.makedirs(os.path.dirname(SRC), exist_ok=True)
REWRITE = "940289f:src/moekit/kernels/csrc/expert_gemm.cpp"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
text = subprocess.run(["git", "-C", ROOT, "show", REWRITE], check=True, capture_output=True, text=True).stdout
text = text.replace("TORCH_LIBRARY(moekit,", "TORCH_LIBRARY(moekit_rw,")
Path(SRC).write_text(text)
cpp_extension.load(
    os.environ.get("RW_NAME", "moekit_rw_iso"),
    [SRC],
    extra_cflags=["-O3", "-mavx512f"] + os.environ.get("RW_FLAGS", "").split(),
    is_python_module=False,
)
rw = torch.ops.moekit_rw


def alternate(cases: dict, rounds: int, warm: int = 2):
    for _ in range(warm):
        for f in cases.values():
            f()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


class RewriteSwiGLU(torch.autograd.Function):
    """The rewrite's native whole-SwiGLU path (routing weight on the output, no biases)."""

    @staticmethod
    def forward(ctx, x, weight, w_in, w_out, token, tasks, order, bounds, threads):
        rows, ff = len(token), w_out.shape[2]
        scale = weight.contiguous()
        xs, ys = x.new_empty(rows, x.shape[1]), x.new_empty(rows, x.shape[1])
        h, a, a_in = x.new_empty(rows, 2 * ff), x.new_empty(rows, ff), x.new_empty(rows, ff)
        rw.expert_swiglu_forward(
            x.contiguous(), token, scale, w_in, w_out, xs, h, a, a_in, ys, tasks, threads
        )
        ctx.save_for_backward(scale, w_in, w_out, xs, h, a, a_in, token, tasks, order, bounds)
        ctx.threads = threads
        out = x.new_empty(x.shape[0], x.shape[1])
        rw.combine_rows(ys, order, bounds, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scale, w_in, w_out, xs, h, a, a_in, token, tasks, order, bounds = ctx.saved_tensors
        gwi, gwo = torch.empty_like(w_in), torch.empty_like(w_out)
        gs = scale.new_empty(len(scale))
        gys, gxs = torch.empty_like(xs), torch.empty_like(xs)
        ga, gh = torch.empty_like(a), torch.empty_like(h)
        rw.expert_swiglu_backward(
            grad_out.contiguous(),
            token,
            scale,
            w_in,
            w_out,
            xs,
            h,
            a,
            a_in,
            gwi,
            gwo,
            gs,
            gys,
            ga,
            gh,
            gxs,
            tasks,
            ctx.threads,
        )
        gx = grad_out.new_empty(grad_out.shape)
        rw.combine_rows(gxs, order, bounds, gx)
        return gx, gs, gwi, gwo, None, None, None, None, None


def thread_stats():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            run, wait, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        out[tid] = (int(run), int(wait))
    return out


def profile(cases: dict, rounds: int):
    """Per case: median wall; summed over rounds: on-CPU seconds of each thread, run-queue wait."""
    acc = {k: {} for k in cases}
    walls = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            before = thread_stats()
            t = time.perf_counter()
            f()
            walls[k].append(time.perf_counter() - t)
            after = thread_stats()
            for tid, (run, wait) in after.items():
                r0, w0 = before.get(tid, (0, 0))
                a = acc[k].setdefault(tid, [0, 0])
                a[0] += run - r0
                a[1] += wait - w0
    for k in cases:
        busy = sorted(
            ((v[0] / rounds / 1e6, v[1] / rounds / 1e6) for v in acc[k].values() if v[0] > 1e5 * rounds),
            reverse=True,
        )
        wall = sorted(walls[k])[rounds // 2] * 1e3
        cpu = sum(b for b, _ in busy)
        print(
            f"    {k:<10} wall {wall:7.1f} ms  cpu {cpu:7.1f} ms  threads(cpu ms, runq-wait ms): "
            + ", ".join(f"({b:.0f}, {w:.0f})" for b, w in busy[:4])
        )


def grouped_inputs(shape, tokens):
    layer = build_layer(shape)
    x, up = shape_input(shape, tokens)
    with torch.no_grad():
        _, routing = layer.forward_with_routing(x)
    kept = routing.compute_assignments
    return layer, x, up, kept


def measure_shape(name: str, rounds: int) -> None:
    shape = SHAPES[name]
    layer, x, up, kept = grouped_inputs(shape, 2048)
    E = shape.num_experts
    w_in = layer.experts.w_in.detach().requires_grad_()
    w_out = layer.experts.w_out.detach().requires_grad_()
    token, expert, weight = kept.token, kept.expert, kept.weight.detach()
    counts = torch.bincount(expert, minlength=E).tolist()
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    nonempty = [(e, offs[e], offs[e + 1]) for e in range(E) if counts[e]]
    tasks = torch.tensor(nonempty, dtype=torch.long).reshape(-1, 3)
    order = torch.argsort(token, stable=True)
    bounds = torch.zeros(x.shape[0] + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(token, minlength=x.shape[0]), 0, out=bounds[1:])
    plan = plan_experts(x, token, expert, w_in, w_out, layer.experts.activation, "output")
    print(
        f"\n== {name}: E={E} rows/expert ~{len(token) // len(nonempty)}, plan path={plan.path} "
        f"loops={plan.loops}"
    )

    # --- per-expert products, one expert's typical rows
    e0, s0, t0 = max(nonempty, key=lambda n: n[2] - n[1])
    m = t0 - s0
    d, ff2 = w_in.shape[2], w_in.shape[1]
    xa = torch.randn(m, d)
    wi = w_in[e0].detach()  # [2ff, d]
    out = torch.empty(m, ff2)
    g = torch.randn(m, ff2)
    gw = torch.empty(ff2, d)
    gin = torch.empty(m, d)
    prods = {
        "fwd x@Wt mkl": lambda: torch.mm(xa, wi.t(), out=out),
        "fwd x@Wt onednn": lambda: _onednn_linear(xa, wi),
        "fwd x@Wt native": lambda: torch.ops.moekit.mm_into(xa, wi.t(), out, None),
        "bwd g@W mkl": lambda: torch.mm(g, wi, out=gin),
        "bwd g@W onednn": lambda: _onednn_linear(g, wi.t()),
        "bwd g@W native": lambda: torch.ops.moekit.mm_into(g, wi, gin, None),
        "wgrad gT@x mkl": lambda: torch.mm(g.t(), xa, out=gw),
        "wgrad gT@x onednn": lambda: _onednn_linear(g.t(), xa.t()),
        "wgrad gT@x native": lambda: torch.ops.moekit.mm_into(g.t(), xa, gw, None),
    }
    flops = 2 * m * d * ff2
    for threads in (1, 2):
        torch.set_num_threads(threads)
        res = alternate(prods, rounds * 3)
        print(
            f"  products of expert {e0} ({m} x {d} x {ff2}), {threads} thread(s): "
            + ", ".join(f"{k} {flops / v / 1e9:.0f} GF/s" for k, v in res.items())
        )
    torch.set_num_threads(2)

    # --- whole grouped experts fwd+bwd
    dense = DenseEquivalent(shape.hidden, shape.top_k * shape.ff)
    xin = x.detach()

    def run_main():
        for p in (w_in, w_out):
            p.grad = None
        xr = xin.requires_grad_()
        y = grouped_experts(
            xr, token, expert, weight, w_in, w_out, None, None, layer.experts.activation, "output"
        )
        y.backward(up)
        return y

    def run_rw(threads=2):
        for p in (w_in, w_out):
            p.grad = None
        xr = xin.requires_grad_()
        y = RewriteSwiGLU.apply(xr, weight, w_in, w_out, token, tasks, order, bounds, threads)
        y.backward(up)
        return y

    def run_dense():
        for p in dense.parameters():
            p.grad = None
        xr = xin.requires_grad_()
        y = dense(xr)
        y.backward(up)

    ya = run_main()
    ga = (w_in.grad.clone(), w_out.grad.clone())
    yb = run_rw()
    print(
        "  rewrite agrees with this checkout:",
        torch.allclose(ya, yb, atol=1e-4, rtol=1e-4),
        torch.allclose(ga[0], w_in.grad, atol=1e-3, rtol=1e-3),
        torch.allclose(ga[1], w_out.grad, atol=1e-3, rtol=1e-3),
    )
    res = alternate({"this": run_main, "rewrite": run_rw, "dense": run_dense}, rounds)
    ours, theirs, dense_s = res["this"], res["rewrite"], res["dense"]
    print(
        f"  grouped fwd+bwd T=2048: this checkout {ours * 1e3:.1f} ms ({ours / dense_s:.2f}x dense), "
        f"rewrite {theirs * 1e3:.1f} ms ({theirs / dense_s:.2f}x), dense {dense_s * 1e3:.1f} ms;"
        f" rewrite/this {theirs / ours:.2f}"
    )
    cases = {"this": run_main, "rewrite": run_rw, "dense": run_dense, "rw_1thr": lambda: run_rw(1)}
    profile(cases, rounds)


def main():
    rounds = int(os.environ.get("ROUNDS", "9"))
    shapes = sys.argv[1:] or ["coarse", "fine", "very_fine"]
    print("load", os.getloadavg(), "threads", torch.get_num_threads())
    for name in shapes:
        measure_shape(name, rounds)
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
