"""The floor the expert GEMMs set: how much of the MoE layer's time is its expert products alone.

    .venv/bin/python benchmarks/expert_products.py --repeats 9 --json runs/bench/expert_products.json

For each shape of `moekit bench layer` (T tokens, forward+backward), side by side in one process,
interleaved round by round: `dense`, the dense-equivalent chain of the layer benchmark; `moekit`,
the whole layer; `products`, only the layer's six expert products per expert (two forward, two
input gradients, two weight gradients) for the routing the layer makes, through the same loops
and buffers as the layer, with no routing, gather, activation or combine; and `torch.mm`, the
same products as one torch.mm per expert (the portable path's loop: MKL or oneDNN underneath).
`products / dense` is the ratio the layer would reach if everything but its GEMMs were free;
`moekit - products` is what the rest costs; `torch.mm` against `products` tells moekit's kernel
apart from the shape (the dense chain runs a few large GEMMs, the experts many small ones).
(Where the layer runs whole experts in one loop or task, as SwiGLU experts on the C++ loops do,
`products` times the same products in the paired path's order.)

`--caches` asks why the products lose: on one thread (so that each expert's operands pass through
one core's caches), the same six products per expert as one torch.mm each, and the dense chain's
six, with every expert's own weights and rows as the layer has them (both read from the last-level
cache: `cold`), or with the first expert's weights and weight gradients (`hot weights`) and/or its
rows and outputs (`hot rows`) standing in for every expert's, which then stay in the core's L2:

    .venv/bin/python benchmarks/expert_products.py --caches --repeats 15
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moekit.runtime import keep_freed_memory, tune_cpu_runtime

tune_cpu_runtime()  # before torch is imported: OpenMP reads its spin count at start-up

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from moekit.bench.layer import SHAPES, Shape, build_layer, timed_step  # noqa: E402
from moekit.bench.machine import cpu_description, cpu_line, thread_round_trip_us  # noqa: E402
from moekit.bench.peers import dense_contenders, moekit_contender  # noqa: E402
from moekit.bench.timing import interleaved_medians  # noqa: E402
from moekit.dispatch.grouped import ExpertLoops, ExpertPlan, PortableLoops, plan_experts  # noqa: E402
from moekit.io import write_json_atomic  # noqa: E402
from moekit.layer import MoE  # noqa: E402


def expert_products_step(loops: ExpertLoops, w_in, w_out, rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """The layer's expert GEMMs for one forward and backward, in the order the layer runs them."""
    h = loops.products(rows["x"], w_in)
    y = loops.products(rows["a"], w_out)
    grad_w_out, grad_a = loops.backward_pairs(rows["grad_y"], rows["a"], w_out, True)
    grad_w_in, grad_x = loops.backward_pairs(rows["grad_h"], rows["x"], w_in, True)
    return {
        "h": h,
        "y": y,
        "grad_w_out": grad_w_out,
        "grad_a": grad_a,
        "grad_w_in": grad_w_in,
        "grad_x": grad_x,
    }


@dataclass(frozen=True)
class ProductsCase:
    """One shape's layer, input and upstream gradient, and the layer's expert products set up for
    the routing the layer makes of that input (random rows of the right sizes)."""

    shape: Shape
    layer: MoE
    x: Tensor
    upstream: Tensor
    plan: ExpertPlan
    rows: dict[str, Tensor]

    @staticmethod
    def build(name: str, tokens: int) -> ProductsCase:
        shape = SHAPES[name]
        layer = build_layer(shape)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, shape.hidden, generator=gen)
        upstream = torch.randn(tokens, shape.hidden, generator=gen)
        with torch.no_grad():
            kept = layer.router(x, None).kept
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        plan = plan_experts(x, kept.token, kept.expert, w_in, w_out, layer.experts.activation)
        rows = {
            "x": torch.randn(len(kept), shape.hidden, generator=gen),
            "a": torch.randn(len(kept), shape.ff, generator=gen),
            "grad_y": torch.randn(len(kept), shape.hidden, generator=gen),
            "grad_h": torch.randn(len(kept), w_in.shape[1], generator=gen),
        }
        return ProductsCase(shape, layer, x, upstream, plan, rows)

    def run_products(self, loops: ExpertLoops | None = None) -> dict[str, Tensor]:
        """The products on the layer's own loops, or on `loops` (the same expert groups)."""
        loops = self.plan.loops if loops is None else loops
        with torch.no_grad():
            return expert_products_step(loops, self.layer.experts.w_in, self.layer.experts.w_out, self.rows)

    def torch_mm_loops(self) -> PortableLoops:
        """The same products as one torch.mm per expert."""
        return PortableLoops(self.plan.groups, grouped_mm=False)


def time_shape(name: str, tokens: int, repeats: int, warmup: int) -> dict[str, float]:
    case = ProductsCase.build(name, tokens)
    shape, x, upstream = case.shape, case.x, case.upstream
    dense = dense_contenders(shape.hidden, shape.ff, shape.top_k)[0]

    def timed_products(loops: ExpertLoops | None) -> float:
        start = time.perf_counter()
        case.run_products(loops)
        return time.perf_counter() - start

    steps = {
        "dense": partial(timed_step, dense, x, upstream, "fwd_bwd"),
        "moekit": partial(timed_step, moekit_contender(case.layer), x, upstream, "fwd_bwd"),
        "products": partial(timed_products, None),
        "products_torch_mm": partial(timed_products, case.torch_mm_loops()),
    }
    return interleaved_medians(steps, repeats, warmup)


def six_products(rows: dict[str, Tensor], w_in: Tensor, w_out: Tensor, out: dict[str, Tensor]) -> None:
    """One expert's products, or the dense chain's: h = x w_in^T, y = a w_out^T, the input
    gradients grad_a = grad_y w_out and grad_x = grad_h w_in, and the weight gradients."""
    torch.mm(rows["x"], w_in.t(), out=out["h"])
    torch.mm(rows["a"], w_out.t(), out=out["y"])
    torch.mm(rows["grad_y"].t(), rows["a"], out=out["grad_w_out"])
    torch.mm(rows["grad_y"], w_out, out=out["grad_a"])
    torch.mm(rows["grad_h"].t(), rows["x"], out=out["grad_w_in"])
    torch.mm(rows["grad_h"], w_in, out=out["grad_x"])


WEIGHT_GRADS = ("grad_w_in", "grad_w_out")


def output_buffers(rows: dict[str, Tensor], w_in: Tensor, w_out: Tensor) -> dict[str, Tensor]:
    """Where `six_products` writes, allocated once: an arm's timing is its products, not the allocator's."""
    like = {"h": rows["grad_h"], "y": rows["grad_y"], "grad_a": rows["a"], "grad_x": rows["x"]}
    return {name: torch.empty_like(t) for name, t in like.items()} | {
        "grad_w_in": torch.empty_like(w_in),
        "grad_w_out": torch.empty_like(w_out),
    }


@dataclass
class DenseProducts:
    """The dense chain's six products, on random operands of its sizes."""

    shape: Shape
    tokens: int

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        wide, hidden = self.shape.top_k * self.shape.ff, self.shape.hidden
        sizes = {"x": hidden, "a": wide, "grad_y": hidden, "grad_h": 2 * wide}
        self.rows = {name: torch.randn(self.tokens, n, generator=gen) for name, n in sizes.items()}
        self.w_in = torch.randn(2 * wide, hidden, generator=gen)
        self.w_out = torch.randn(hidden, wide, generator=gen)
        self.out = output_buffers(self.rows, self.w_in, self.w_out)

    def run(self) -> None:
        six_products(self.rows, self.w_in, self.w_out, self.out)


@dataclass
class CachedProducts:
    """The layer's six products per expert as one torch.mm each. `hot_weights`: the first expert's
    weights and weight-gradient slices stand in for every expert's; `hot_rows`: the first rows and
    output rows of each buffer stand in for every expert's own. What stands in stays in cache."""

    case: ProductsCase
    hot_weights: bool
    hot_rows: bool

    def __post_init__(self) -> None:
        experts = self.case.layer.experts
        self.w_in, self.w_out = experts.w_in.detach(), experts.w_out.detach()
        self.out = output_buffers(self.case.rows, self.w_in, self.w_out)

    def run(self) -> None:
        rows, out, w_in, w_out = self.case.rows, self.out, self.w_in, self.w_out
        nonempty = self.case.plan.groups.nonempty
        first = nonempty[0][0]
        for expert, begin, end in nonempty:
            e = first if self.hot_weights else expert
            r = slice(0, end - begin) if self.hot_rows else slice(begin, end)
            views = {name: t[e] if name in WEIGHT_GRADS else t[r] for name, t in out.items()}
            six_products({name: t[r] for name, t in rows.items()}, w_in[e], w_out[e], views)


CACHE_ARMS = {
    "cold": (False, False),
    "hot weights": (True, False),
    "hot rows": (False, True),
    "hot both": (True, True),
}


def seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def caches_table(shapes: list[str], tokens: int, repeats: int, warmup: int) -> list[dict]:
    """--caches: GFLOP/s of the experts' products cold and hot against the dense chain's, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    print(f"one thread, T={tokens}, median of {repeats} rounds: GFLOP/s (ratio of time to dense)")
    print(f"{'shape':>10} {'dense':>8}" + "".join(f" {name:>20}" for name in CACHE_ARMS))
    try:
        for name in shapes:
            case = ProductsCase.build(name, tokens)
            shape = case.shape
            # per assignment: 2 flops x 3 passes (forward, input and weight gradients) x (2 ff + ff) d MACs
            flops = 2 * 3 * tokens * shape.top_k * 3 * shape.ff * shape.hidden
            steps = {"dense": partial(seconds, DenseProducts(shape, tokens).run)}
            steps |= {
                arm: partial(seconds, CachedProducts(case, *hot).run) for arm, hot in CACHE_ARMS.items()
            }
            medians = interleaved_medians(steps, repeats, warmup)
            dense = medians["dense"]
            cells = "".join(
                f" {flops / medians[arm] / 1e9:11.1f} ({medians[arm] / dense:.2f}x)" for arm in CACHE_ARMS
            )
            print(f"{name:>10} {flops / dense / 1e9:8.1f}{cells}")
            results.append(
                {
                    "shape": name,
                    "tokens": tokens,
                    "gflop": flops / 1e9,
                    **{f"{k}_s": v for k, v in medians.items()},
                }
            )
    finally:
        torch.set_num_threads(threads)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--caches", action="store_true", help="the products cold and hot, one thread (above)")
    args = parser.parse_args()
    keep_freed_memory()
    cpu = cpu_description()
    print(f"CPU: {cpu_line(cpu)}")
    if args.caches:
        results = caches_table(args.shapes, args.tokens, args.repeats, args.warmup)
        if args.json is not None:
            settings = {"repeats": args.repeats, "threads": 1}
            write_json_atomic(args.json, {"cpu": cpu, "settings": settings, "results": results})
        return
    before = thread_round_trip_us()
    results = []
    print(f"fwd+bwd at T={args.tokens}, median of {args.repeats} rounds; ratios against dense")
    print(f"{'shape':>10} {'dense':>10} {'moekit':>18} {'products':>18} {'rest':>10} {'torch.mm':>18}")
    for name in args.shapes:
        medians = time_shape(name, args.tokens, args.repeats, args.warmup)
        dense, moekit, products = medians["dense"], medians["moekit"], medians["products"]
        torch_mm = medians["products_torch_mm"]
        print(
            f"{name:>10} {dense * 1e3:7.2f} ms {moekit * 1e3:7.2f} ms ({moekit / dense:.2f}x)"
            f" {products * 1e3:7.2f} ms ({products / dense:.2f}x) {(moekit - products) * 1e3:7.2f} ms"
            f" {torch_mm * 1e3:7.2f} ms ({torch_mm / dense:.2f}x)"
        )
        results.append({"shape": name, "tokens": args.tokens, **{f"{k}_s": v for k, v in medians.items()}})
    after = thread_round_trip_us()
    print(f"thread wake-up round trip: {before:.0f} us before, {after:.0f} us after")
    if args.json is not None:
        settings = {"repeats": args.repeats, "thread_round_trip_us": {"before": before, "after": after}}
        write_json_atomic(args.json, {"cpu": cpu, "settings": settings, "results": results})


if __name__ == "__main__":
    main()
