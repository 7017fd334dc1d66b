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
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moekit.runtime import keep_freed_memory, tune_cpu_runtime

tune_cpu_runtime()  # before torch is imported: OpenMP reads its spin count at start-up

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from moekit.bench.layer import SHAPES, Shape, build_layer, timed_step  # noqa: E402
from moekit.bench.machine import thread_round_trip_us  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    keep_freed_memory()
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
        write_json_atomic(args.json, {"settings": settings, "results": results})


if __name__ == "__main__":
    main()
