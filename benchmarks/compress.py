"""Quality against compression for moekit's expert pruning, merging and quantization, on an MoE
trained on the built-in corpus (`configs/tiny-moe.yaml`: 4 MoE layers of 16 routed experts, top-2,
one shared expert).

    .venv/bin/moekit train --config configs/tiny-moe.yaml --set out_dir=runs/compress-bench
    .venv/bin/python benchmarks/compress.py runs/compress-bench --out runs/bench/compress.json \
        --calib-batches 5 --eval-batches 5 --batch-size 4 --keep 8 4

One calibration pass (the run corpus's validation split, balanced across the five domains) feeds
every method; every compressed model is scored on the same held-out validation batches: per-domain
loss (nats/token) and top-k router agreement with the original. Also: each domain's own REAP mask
(PreMoe-style) scored on every domain, and the seconds each method takes after calibration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moekit.analysis.cli import LoadedModel
from moekit.analysis.data import analysis_batches
from moekit.compress.calibrate import calibrate
from moekit.compress.evaluate import compare, reference
from moekit.compress.merge import merge
from moekit.compress.prune import prune, top_experts
from moekit.compress.quantize_model import quantize_model
from moekit.compress.recipe import QuantizeRecipe
from moekit.compress.surgery import select_rows
from moekit.io import write_json_atomic


def keep_map(keep, num):
    m = torch.full((num,), -1, dtype=torch.long)
    m[keep] = torch.arange(keep.numel())
    return m


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/compress.json"))
    parser.add_argument("--calib-batches", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--keep", type=int, nargs="+", default=None, help="experts kept (default E/2)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="uniform bit widths")
    parser.add_argument("--mean-bits", type=float, nargs="+", default=[2.5], help="allocated means")
    parser.add_argument("--skip-quant", action="store_true")
    parser.add_argument(
        "--sub-moe-rank", type=int, nargs="+", default=[0], help="Sub-MoE ranks (0: full rank)"
    )
    parser.add_argument(
        "--merge-only", action="store_true",
        help="only frequency pruning, HC-SMoE and Sub-MoE (no other scores, masks or quantization)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = LoadedModel(args.run)
    model = loaded.model.eval()
    n_cal, n_eval = args.calib_batches, args.eval_batches
    data = analysis_batches(
        "corpus", loaded.tokenizer, batch_size=args.batch_size, seq_len=args.seq_len,
        num_batches=n_cal + n_eval, layout=loaded.layout, data_config=loaded.data_config,
    )  # fmt: skip
    cal_batches, held_out = data.batches[:n_cal], data.batches[n_cal:]
    names = data.domain_names
    num = model.moe_layers[0].experts.num_experts
    results: dict[str, dict] = {}

    ref = reference(model, held_out, names)

    def record(label, compressed, maps, seconds, **extra):
        quality = compare(ref, compressed, held_out, names, maps)
        results[label] = {
            "loss": quality["loss_after"],
            "agreement": float(np.mean(quality["router_topk_agreement"])),
            "seconds": seconds,
            **extra,
        }
        results.setdefault("original", {"loss": quality["loss_before"], "agreement": 1.0, "seconds": 0.0})
        print(
            f"{label:32s} loss {quality['loss_after']['all']:.4f}  "
            f"agreement {results[label]['agreement']:.3f}  {seconds:.2f}s",
            flush=True,
        )

    with torch.no_grad():
        started = time.perf_counter()
        calibration = calibrate(model, cal_batches, hessians=not args.skip_quant)
        calib_seconds = time.perf_counter() - started
        print(
            f"calibration: {calibration.num_tokens} tokens, {calib_seconds:.1f}s; "
            f"never routed {calibration.never_routed()}"
        )
        for keep in args.keep or [num // 2]:
            scores = (
                ("frequency",) if args.merge_only else ("frequency", "gate_weight", "ean", "reap", "stun")
            )
            for method in scores:
                t = time.perf_counter()
                result = prune(model, calibration, method, keep)
                record(
                    f"prune {method} {keep}/{num}",
                    result.model,
                    [keep_map(k, num) for k in result.keep],
                    time.perf_counter() - t,
                    experts=keep,
                )
            gen = torch.Generator().manual_seed(0)
            keeps = [
                top_experts(torch.rand(num, generator=gen, dtype=torch.float64), keep)
                for _ in calibration.layers
            ]
            record(
                f"prune random {keep}/{num}",
                select_rows(model, keeps),
                [keep_map(k, num) for k in keeps],
                0.0,
                experts=keep,
            )
            for align in (True, False):
                t = time.perf_counter()
                merged = merge(model, calibration, keep, align=align)
                label = f"merge hc-smoe{'' if align else ' unaligned'} {keep}/{num}"
                record(label, merged.model, merged.labels, time.perf_counter() - t, experts=keep)
            for rank in args.sub_moe_rank:
                t = time.perf_counter()
                merged = merge(model, calibration, keep, method="sub_moe", rank=rank or None)
                label = f"merge sub-moe rank {rank or 'full'} {keep}/{num}"
                record(label, merged.model, merged.labels, time.perf_counter() - t, experts=keep)
        if args.merge_only:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, json.loads(json.dumps(results, default=float)))
            print(f"wrote {args.out}")
            return
        # PreMoe-style task-conditioned masks: REAP on one domain's calibration tokens
        domain_rows = {}
        for d, name in enumerate(names):
            only = [
                b
                for b in cal_batches
                if int((b.domains == d).sum()) > 0
                and int((b.domains == d).sum()) == int((b.domains >= 0).sum())
            ]
            if not only:
                continue
            masks = prune(model, calibrate(model, only), "reap", num // 2)
            quality = compare(ref, masks.model, held_out, names, [keep_map(k, num) for k in masks.keep])
            domain_rows[name] = quality["loss_after"]
            print(
                f"premoe mask {name:14s} "
                + " ".join(f"{k}={v:.3f}" for k, v in quality["loss_after"].items()),
                flush=True,
            )
        results["premoe_masks"] = domain_rows
        if not args.skip_quant:
            for algorithm, hessian in (("rtn", "routed"), ("gptq", "routed"), ("gptq", "affinity")):
                for bits in args.bits:
                    t = time.perf_counter()
                    recipe = QuantizeRecipe(
                        algorithm=algorithm,
                        hessian=hessian,
                        bits=bits,
                        group_size=32,
                        protect_super_experts=False,
                    )
                    q = quantize_model(model, calibration, recipe)
                    record(
                        f"quant {algorithm} {hessian} {bits}b",
                        q.model,
                        [torch.arange(num)] * len(calibration.layers),
                        time.perf_counter() - t,
                        bits=bits,
                        packed_bytes=q.bytes_after,
                    )
            for mean_bits in args.mean_bits:
                t = time.perf_counter()
                recipe = QuantizeRecipe(
                    algorithm="gptq",
                    hessian="affinity",
                    bits=None,
                    mean_bits=mean_bits,
                    choices=(2, 3, 4, 8),
                    group_size=32,
                    protect_super_experts=False,
                )
                q = quantize_model(model, calibration, recipe)
                flat = [b for row in q.bits for b in row]
                record(
                    f"quant milp gptq {mean_bits}b",
                    q.model,
                    [torch.arange(num)] * len(calibration.layers),
                    time.perf_counter() - t,
                    bits=float(np.mean(flat)),
                    histogram={b: flat.count(b) for b in sorted(set(flat))},
                    packed_bytes=q.bytes_after,
                )
                # the control: the same bit widths, shuffled across experts (equal size)
                rng = np.random.default_rng(0)
                shuffled = [int(b) for b in rng.permutation(flat)]
                fixed = [shuffled[i * num : (i + 1) * num] for i in range(len(calibration.layers))]
                q2 = quantize_model(model, calibration, recipe, bits=fixed)
                record(
                    f"quant shuffled-bits gptq {mean_bits}b",
                    q2.model,
                    [torch.arange(num)] * len(calibration.layers),
                    0.0,
                    bits=float(np.mean(flat)),
                    packed_bytes=q2.bytes_after,
                )
    results["meta"] = {
        "calibration_tokens": calibration.num_tokens,
        "calibration_seconds": calib_seconds,
        "domains": list(names),
        "eval_batches": n_eval,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, json.loads(json.dumps(results, default=float)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
