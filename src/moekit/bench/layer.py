"""`moekit bench layer`: the MoE layer side by side with the dense-equivalent GEMM chain and peers.

All implementations of one shape share weights and inputs and are timed in the same process,
interleaved round by round (in a rotating order, since what ran just before affects the caches),
so that machine noise hits them alike; each figure is the median of `repeats` rounds after
warm-up. Backward is driven by a fixed random upstream gradient. `--dtype bf16` runs every
implementation's forward under bf16 autocast (moekit's router stays fp32), timed in the same rounds
as fp32; each row's ratio is against the dense chain of its own dtype.

The JSON records the CPU (model, vector features, cores) and the dispatch each shape took, so that
figures from different machines are never read as one. Forward rows of at most `DECODE_TOKENS`
tokens also carry `ratio_vs_weight_reads`: the time against the real limit of a decode step, the
bytes of the experts it activates over this machine's measured memory bandwidth. `--busy` runs the
same table while a background process keeps one core busy (a shared or loaded machine).
"""

from __future__ import annotations

import importlib.util
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from moekit.bench.machine import (
    busy_core,
    cpu_description,
    cpu_line,
    memory_read_bandwidth,
    thread_round_trip_us,
)
from moekit.bench.peers import PEER_PACKAGES, PEERS, Contender, dense_contenders, moekit_contender
from moekit.bench.timing import interleaved_medians
from moekit.device import DTYPES, autocast, resolve_dtype, warn_if_slow_bf16
from moekit.errors import require_int
from moekit.io import write_json_atomic
from moekit.layer import MoE, MoEConfig
from moekit.routing.spec import preset


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    ff: int


SHAPES = {
    "coarse": Shape("coarse", 8, 2, 512, 1024),
    "fine": Shape("fine", 64, 6, 512, 256),
    "very_fine": Shape("very_fine", 128, 8, 256, 128),
}
TOKEN_COUNTS = (2048, 8)
MODES = ("fwd", "fwd_bwd")
# Forward rows of at most this many tokens are also compared with their weight reads (decode).
DECODE_TOKENS = 64


def build_layer(shape: Shape, backend: str = "auto", seed: int = 0) -> MoE:
    """A Qwen3-MoE-style layer (softmax -> top-k -> renormalise, SwiGLU experts), its weights drawn
    from `seed`: the routing, and with it every expert's row count, is the same from run to run."""
    config = MoEConfig(
        hidden_size=shape.hidden,
        ff_size=shape.ff,
        router=preset("qwen3_moe", shape.num_experts, shape.top_k),
        backend=backend,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoE(config).train()


def contenders_for(
    shape: Shape, peers: list[str], notes: list[str], backend: str = "auto"
) -> list[Contender]:
    layer = build_layer(shape, backend)
    out = [moekit_contender(layer), *dense_contenders(shape.hidden, shape.ff, shape.top_k)]
    for peer in peers:
        package = PEER_PACKAGES[peer]
        if importlib.util.find_spec(package) is None:
            notes.append(f"{peer}: skipped, `{package}` is not installed (pip install 'moekit[bench]')")
            continue
        try:
            out += PEERS[peer](layer)
        except Exception as exc:  # a peer failing to build must not stop the benchmark
            notes.append(f"{peer}: skipped, it failed to build: {type(exc).__name__}: {exc}")
    return out


def timed_step(
    contender: Contender, x: torch.Tensor, upstream: torch.Tensor, mode: str, dtype: str = "fp32"
) -> float:
    """Seconds for one forward (under no_grad) or forward and backward of a contender; the
    forward in `dtype` (bf16: autocast), the backward outside autocast as in training."""
    for p in contender.module.parameters():
        p.grad = None
    xin = x.detach().requires_grad_(mode == "fwd_bwd")
    precision = autocast(x.device, resolve_dtype(dtype))
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad(), precision:
            contender.run(xin)
    else:
        with precision:
            y = contender.run(xin)
        y.backward(upstream.to(y.dtype))
    return time.perf_counter() - start


def shape_input(shape: Shape, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states and upstream gradient every contender of a shape is timed on."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, generator=gen)
    upstream = torch.randn(tokens, shape.hidden, generator=gen)
    return x, upstream


def dispatch_choice(layer: MoE, x: torch.Tensor) -> dict:
    """How the layer's experts run on `x`: the dispatch path and kernels it takes, and the bytes
    of the experts its routing activates (what a decode step must read)."""
    from moekit.dispatch.grouped import plan_experts
    from moekit.kernels.gemm import gemm_kernel
    from moekit.kernels.native import kernel_isa

    experts = layer.experts
    with torch.no_grad():
        _, routing = layer.forward_with_routing(x)
        kept = routing.compute_assignments
        plan = plan_experts(
            x, kept.token, kept.expert, experts.w_in, experts.w_out, experts.activation,
            layer.config.router.weight_on, layer.config.backend,
        )  # fmt: skip
    active = int(torch.unique(kept.expert).numel())
    per_expert = (experts.w_in[0].numel() + experts.w_out[0].numel()) * experts.w_in.element_size()
    loops = plan.loops
    kernel = getattr(loops, "kernel", "grouped_mm" if getattr(loops, "grouped_mm", False) else "torch.mm")
    return dict(
        path=plan.path,
        kernel=kernel,
        # the vector set the tile kernel was built for (its register tile follows from it)
        native_isa=kernel_isa() if kernel == "tile" else None,
        threads=getattr(loops, "threads", torch.get_num_threads()),
        gemm=gemm_kernel(x.dtype),
        active_experts=active,
        active_weight_bytes=active * per_expert,
    )


def time_shape(
    shape: Shape,
    tokens: int,
    mode: str,
    contenders: list[Contender],
    repeats: int,
    warmup: int,
    seed: int = 0,
    dtypes: tuple[str, ...] = ("fp32",),
) -> dict[str, float]:
    """Medians by implementation, named `impl` in fp32 and `impl bf16` in bf16."""
    x, upstream = shape_input(shape, tokens, seed)
    steps = {
        impl_name(c.impl, dtype): partial(timed_step, c, x, upstream, mode, dtype)
        for dtype in dtypes
        for c in contenders
    }
    return interleaved_medians(steps, repeats, warmup)


def impl_name(impl: str, dtype: str) -> str:
    return impl if dtype == "fp32" else f"{impl} {dtype}"


def _dense_of(impl: str, medians: dict[str, float]) -> float:
    """The dense chain's median in the same dtype as `impl`."""
    dtype = next((d for d in DTYPES if impl.endswith(f" {d}")), "fp32")
    return medians[impl_name("dense", dtype)]


def run_layer_benchmark(
    shapes: list[str],
    token_counts: list[int],
    modes: list[str],
    peers: list[str],
    repeats: int = 7,
    warmup: int = 2,
    backend: str = "auto",
    progress=print,
    dtypes: tuple[str, ...] = ("fp32",),
    busy: bool = False,
) -> dict:
    """Every shape, token count and mode, contenders side by side (see the module docstring);
    `busy`: while a background process keeps one core busy."""
    notes: list[str] = []
    for dtype in dtypes:
        warn_if_slow_bf16(resolve_dtype(dtype), torch.device("cpu"))
    results = []
    dispatch = []
    bandwidth = memory_read_bandwidth() if any(t <= DECODE_TOKENS for t in token_counts) else None
    round_trip_before = thread_round_trip_us()
    with busy_core() if busy else nullcontext():
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            contenders = contenders_for(shape, peers, notes, backend)
            for tokens in token_counts:
                choice = dispatch_choice(contenders[0].module, shape_input(shape, tokens)[0])
                dispatch.append(dict(shape=shape_name, tokens=tokens, **choice))
                limit = choice["active_weight_bytes"] / bandwidth if bandwidth else None
                for mode in modes:
                    medians = time_shape(shape, tokens, mode, contenders, repeats, warmup, dtypes=dtypes)
                    for impl, median in medians.items():
                        row = dict(
                            shape=shape_name,
                            tokens=tokens,
                            mode=mode,
                            impl=impl,
                            median_s=median,
                            ratio_vs_dense=median / _dense_of(impl, medians),
                        )
                        if mode == "fwd" and tokens <= DECODE_TOKENS and limit:
                            row["ratio_vs_weight_reads"] = median / limit
                        results.append(row)
                    progress(
                        format_rows(
                            [
                                r
                                for r in results
                                if r["shape"] == shape_name and r["tokens"] == tokens and r["mode"] == mode
                            ]
                        )
                    )
        round_trip_after = thread_round_trip_us()
    return dict(
        results=results,
        notes=sorted(set(notes)),
        cpu=cpu_description(),
        dispatch=dispatch,
        settings=dict(
            repeats=repeats,
            warmup=warmup,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            busy=busy,
            memory_read_bytes_per_s=bandwidth,
            load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            thread_round_trip_us=dict(before=round_trip_before, after=round_trip_after),
        ),
    )


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"{r['shape']:>10} T={r['tokens']:<5} {r['mode']:<8} {r['impl']:<14} "
            f"{r['median_s'] * 1e3:9.2f} ms   {r['ratio_vs_dense']:6.2f}x dense"
            + (f"   {r['ratio_vs_weight_reads']:5.2f}x weight reads" if "ratio_vs_weight_reads" in r else "")
        )
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """Markdown table: one row per shape/tokens/mode, one column per implementation."""
    results = report["results"]
    impls = []
    for r in results:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    header = "| shape | T | mode | " + " | ".join(impls) + " |"
    lines = [header, "|" + "---|" * (3 + len(impls))]
    keys = []
    for r in results:
        key = (r["shape"], r["tokens"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        row = {r["impl"]: r for r in results if (r["shape"], r["tokens"], r["mode"]) == key}
        cells = []
        for impl in impls:
            r = row.get(impl)
            cells.append("—" if r is None else f"{r['median_s'] * 1e3:.2f} ms ({r['ratio_vs_dense']:.2f}x)")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_arguments(args) -> None:
    """Counts the benchmark cannot run with, before any work (one line naming the option)."""
    for tokens in args.tokens:
        require_int("--tokens", tokens, 1)
    require_int("--repeats", args.repeats, 1)
    require_int("--warmup", args.warmup, 0)


def main(args) -> int:
    check_arguments(args)
    report = run_layer_benchmark(
        shapes=args.shapes,
        token_counts=args.tokens,
        modes=args.modes,
        peers=args.peers,
        repeats=args.repeats,
        warmup=args.warmup,
        backend=args.backend,
        dtypes=tuple(dict.fromkeys(args.dtype)),
        busy=args.busy,
    )
    print()
    cpu = report["cpu"]
    print(f"CPU: {cpu_line(cpu)}")
    if report["settings"]["busy"]:
        print("busy: one core was kept busy by a background process throughout")
    print(format_table(report))
    for row in report["results"]:
        if "ratio_vs_weight_reads" in row and row["impl"] == "moekit":
            print(
                f"decode {row['shape']} T={row['tokens']}: {row['ratio_vs_weight_reads']:.2f}x the time "
                "to read its active experts' weights at the measured memory bandwidth "
                f"({report['settings']['memory_read_bytes_per_s'] / 1e9:.1f} GB/s)"
            )
    for note in report["notes"]:
        print(f"note: {note}")
    round_trip = report["settings"]["thread_round_trip_us"]
    print(
        f"thread wake-up round trip: {round_trip['before']:.0f} us before, {round_trip['after']:.0f} us "
        "after (higher means the OS is slower to wake threads, which slows every hand-off between threads)"
    )
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="auto", choices=["auto", "loop", "grouped_mm"])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="run while a background process keeps one core busy (a loaded machine)",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=list(DTYPES),
        help="precisions to time side by side (bf16: autocast, as `train.dtype: bf16`)",
    )
