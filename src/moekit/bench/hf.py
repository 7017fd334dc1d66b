"""`moekit bench hf`: a full training step of stock transformers MoE models vs the same models
patched with `moekit.patch`.

For tiny Qwen3-MoE-style and OLMoE-style models with fine-grained experts, each contender (HF
eager experts, HF grouped_mm experts, moekit-patched) is its own copy of the same weights with its
own AdamW, and times forward, LM loss, backward and optimizer step on the same batch. Contenders
run interleaved round by round in one process (same runtime settings), and each figure is the
median over the timed rounds after warm-up. Before timing, the patched model's loss and gradients
are checked against stock HF's on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, require_int

STYLES = ("qwen3_moe", "olmoe")


@dataclass(frozen=True)
class BenchShape:
    hidden: int = 256
    layers: int = 4
    experts: int = 64
    top_k: int = 8
    expert_ff: int = 128
    heads: int = 4
    vocab: int = 4096
    batch: int = 4
    seq: int = 128


def style_overrides(style: str, shape: BenchShape) -> dict[str, Any]:
    """Config fields of a fine-grained `style` model of `shape` (on top of `interop.tiny`'s)."""
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=max(4096, shape.seq),
    )
    if style == "qwen3_moe":  # Qwen3-30B-A3B-like: per-head QK-norm, renormalised top-k
        return dict(
            common,
            head_dim=shape.hidden // shape.heads,
            moe_intermediate_size=shape.expert_ff,
            intermediate_size=4 * shape.expert_ff,
            norm_topk_prob=True,
            attention_bias=False,
        )
    return dict(common, intermediate_size=shape.expert_ff, norm_topk_prob=False, clip_qkv=None)


@dataclass
class Contender:
    name: str
    model: Any
    optimizer: Any


def build_contenders(style: str, shape: BenchShape, backend: str, seed: int = 0) -> list[Contender]:
    import torch

    from moekit.interop.patch import patch
    from moekit.interop.tiny import tiny_model

    base = tiny_model(style, seed=seed, **style_overrides(style, shape))
    with torch.no_grad():  # training-like scales: HF's init rather than the tests' wide one
        for p in base.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    out = []
    for name in ("hf_eager", "hf_grouped_mm", "moekit_patch"):
        model = copy.deepcopy(base).train()
        if name == "moekit_patch":
            patch(model, backend=backend)
        else:
            model.set_experts_implementation(name.removeprefix("hf_"))
        out.append(Contender(name, model, torch.optim.AdamW(model.parameters(), lr=1e-4)))
    return out


def train_step(contender: Contender, ids, mask) -> float:
    start = time.perf_counter()
    loss = contender.model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    contender.optimizer.step()
    contender.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def check_agreement(contenders: list[Contender], ids, mask) -> dict[str, float]:
    """Largest |loss| and |grad| difference of each contender from HF eager, before any step."""
    reference, *others = contenders
    losses, grads = {}, {}
    for c in contenders:
        loss = c.model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses[c.name] = loss.detach()
        grads[c.name] = [p.grad.detach().clone() for p in c.model.parameters()]
        c.optimizer.zero_grad(set_to_none=True)
    out = {}
    for c in others:
        diff = max(
            (a - b).abs().max().item() for a, b in zip(grads[c.name], grads[reference.name], strict=True)
        )
        out[c.name] = max(diff, (losses[c.name] - losses[reference.name]).abs().item())
    return out


def run_hf_benchmark(
    styles: list[str], shape: BenchShape, repeats: int, warmup: int, backend: str, progress=print
) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    mask = torch.ones_like(ids)
    results = []
    for style in styles:
        contenders = build_contenders(style, shape, backend)
        agreement = check_agreement(contenders, ids, mask)
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        for round_index in range(warmup + repeats):
            for c in contenders:
                elapsed = train_step(c, ids, mask)
                if round_index >= warmup:
                    times[c.name].append(elapsed)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        row = dict(
            style=style,
            tokens=shape.batch * shape.seq,
            median_s=medians,
            max_abs_diff_vs_hf_eager=agreement,
            patch_speedup_vs_eager=medians["hf_eager"] / medians["moekit_patch"],
            patch_speedup_vs_grouped_mm=medians["hf_grouped_mm"] / medians["moekit_patch"],
        )
        results.append(row)
        progress(
            f"{style}: "
            + ", ".join(f"{name} {m * 1e3:.0f} ms" for name, m in medians.items())
            + f"; patched vs HF eager: loss/grad max diff {agreement['moekit_patch']:.1e}"
        )
    from moekit.bench.machine import cpu_description

    return dict(
        results=results,
        shape=shape.__dict__,
        cpu=cpu_description(),
        settings=dict(
            repeats=repeats,
            warmup=warmup,
            backend=backend,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            transformers=__import__("transformers").__version__,
        ),
    )


def format_table(report: dict) -> str:
    from moekit.bench.machine import cpu_line

    s = report["shape"]
    lines = [
        f"CPU: {cpu_line(report['cpu'])}",
        f"Training step (forward + LM loss + backward + AdamW), {s['layers']} layers, hidden {s['hidden']}, "
        f"{s['experts']} experts top-{s['top_k']} of ff {s['expert_ff']}, batch {s['batch']}x{s['seq']}, "
        f"median of {report['settings']['repeats']} rounds, {report['settings']['threads']} threads:",
        "",
        "| model | HF eager | HF grouped_mm | moekit patch | patch vs eager | patch vs grouped_mm |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["median_s"]
        tokens = r["tokens"]

        def cell(name: str, m=m, tokens=tokens) -> str:
            return f"{m[name] * 1e3:.0f} ms ({tokens / m[name]:.0f} tok/s)"

        lines.append(
            f"| {r['style']}-style | {cell('hf_eager')} | {cell('hf_grouped_mm')} | {cell('moekit_patch')} "
            f"| {r['patch_speedup_vs_eager']:.2f}x | {r['patch_speedup_vs_grouped_mm']:.2f}x |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchShape()
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES))
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--experts", type=int, default=d.experts)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--expert-ff", type=int, default=d.expert_ff, help="each routed expert's FFN size")
    parser.add_argument("--vocab", type=int, default=d.vocab)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--seq", type=int, default=d.seq)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["auto", "loop", "grouped_mm"])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def check_arguments(args: argparse.Namespace) -> None:
    """The shape and counts, before any work, each error naming the option as typed."""
    for name in ("hidden", "layers", "experts", "top_k", "expert_ff", "vocab", "batch", "seq", "repeats"):
        require_int("--" + name.replace("_", "-"), getattr(args, name), 1)
    require_int("--warmup", args.warmup, 0)
    if args.top_k > args.experts:
        raise ConfigError("--top-k", f"got {args.top_k}, expected at most --experts ({args.experts})")
    heads = BenchShape.heads
    if args.hidden % (2 * heads):
        expected = f"expected a multiple of {2 * heads} ({heads} attention heads of even size)"
        raise ConfigError("--hidden", f"got {args.hidden}, {expected}")


def main(args: argparse.Namespace) -> int:
    from moekit.io import write_json_atomic
    from moekit.runtime import keep_freed_memory

    check_arguments(args)
    keep_freed_memory()
    shape = BenchShape(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        expert_ff=args.expert_ff,
        vocab=args.vocab,
        batch=args.batch,
        seq=args.seq,
    )
    report = run_hf_benchmark(args.styles, shape, args.repeats, args.warmup, args.backend)
    print()
    print(format_table(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from moekit.runtime import tune_cpu_runtime

    tune_cpu_runtime()  # before torch is imported
    parser = argparse.ArgumentParser(prog="moekit bench hf", description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
