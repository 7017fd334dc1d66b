"""moekit.merging beside mergekit's merge methods, side by side in one process: equality and time.

    PYTHONPATH=src PATH/TO/python-with-mergekit benchmarks/merging_vs_mergekit.py [--repeats 5]

mergekit is not a moekit dependency (it pins its own transformers); run this with a Python that has
mergekit 0.1.5 and torch, with moekit's `src` on PYTHONPATH (moekit.merging needs only torch).
The inputs are one Qwen3-MoE-sized layer's worth of random float32 tensors, a base and three
fine-tuned copies: a fused gate_up_proj (E, 2I, H), a fused down_proj (E, H, I) and the four
attention projections. Both tools merge the same tensors in memory (no file I/O): mergekit by its
method's `merge_group` per tensor, moekit by `merge_state_dicts` over the dict. Times are medians
of `--repeats` runs; equality is the max |difference| over all tensors (DARE: mergekit's masks are
seeded per tensor like moekit's and it runs with rescale off, so moekit's delta is scaled by 1-p).
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib.metadata import version

import torch

from moekit.merging import merge_state_dicts, tensor_seed


def inputs(experts: int, hidden: int, inter: int, models: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mlp.experts.gate_up_proj": (experts, 2 * inter, hidden),
        "mlp.experts.down_proj": (experts, hidden, inter),
        **{f"self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"},
    }
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    finetuned = [
        {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(models)
    ]
    return base, finetuned


def run_mergekit(method_name: str, base, finetuned, params: dict, seed: int | None):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(method_name)
    out = {}
    for name, tensor in base.items():
        group = TensorGroup.from_tensors([tensor, *(f[name] for f in finetuned)], base_index=0, name=name)
        if seed is not None:
            torch.manual_seed(tensor_seed(seed, name))
        out[name] = method.merge_group(group, **params)
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    args = parser.parse_args()
    base, finetuned = inputs(args.experts, args.hidden, args.inter, models=3)
    n = len(finetuned)
    ones = {i + 1: 1.0 for i in range(n)}

    def per_model(value):
        return {i + 1: value for i in range(n)}

    shared = {"int8_mask": False, "rescale": False, "lambda": 1.0}
    dare = {"drop_rate": 0.5, "seed": 7}
    ties_global = {"density": 0.3, "experts": {}}  # no fused tensors: one threshold, like mergekit
    # label, moekit method and params, mergekit params (None: no mergekit counterpart), seed, p
    cases = [
        ("task_arithmetic", "ta", {}, {"normalize": False, "density": per_model(1.0)}, None, 0.0),
        ("ties", "ties", ties_global, {"normalize": True, "density": per_model(0.3)}, None, 0.0),
        ("ties (moekit per expert)", "ties", {"density": 0.3}, None, None, 0.0),
        ("dare_linear", "dare_ta", dare, {"normalize": False, "density": per_model(0.5)}, 7, 0.5),
        ("dare_ties", "dare_ties", dare, {"normalize": True, "density": per_model(0.5)}, 7, 0.5),
        ("pcb (moekit only)", "pcb", {"ratio": 0.1}, None, None, 0.0),
    ]  # fmt: skip
    print(f"mergekit {version('mergekit')}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{sum(v.numel() for v in base.values()):,} parameters per model, {n} fine-tuned models, float32")
    print(f"{'method':28s} {'moekit s':>9s} {'mergekit s':>11s} {'max |diff|':>11s} {'entries > 1e-6':>15s}")
    for label, ours_method, ours_params, theirs_params, seed, drop in cases:

        def ours(method=ours_method, params=ours_params):
            return merge_state_dicts(base, finetuned, method, **params)

        mine_t, mine = timed(ours, args.repeats)
        if theirs_params is None:
            print(f"{label:28s} {mine_t:9.3f} {'-':>11s} {'-':>11s} {'-':>15s}")
            continue
        params = {**shared, **theirs_params, "weight": ones}
        method = label.split(" ")[0]
        theirs_t, theirs = timed(lambda: run_mergekit(method, base, finetuned, params, seed), args.repeats)  # noqa: B023
        worst, differing = 0.0, 0
        for name in base:
            a = (mine[name] - base[name]) * (1 - drop) if drop else mine[name]
            b = theirs[name] - base[name] if drop else theirs[name]
            worst = max(worst, float((a - b).abs().max()))
            differing += int(((a - b).abs() > 1e-6).sum())
        print(f"{label:28s} {mine_t:9.3f} {theirs_t:11.3f} {worst:11.2e} {differing:15d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
