"""Offloaded decode: routed experts streamed from disk under a budget, per cache policy.

    .venv/bin/python benchmarks/offload.py --out runs/bench/offload.json [--cold]

A Qwen3-MoE-shaped model of random weights with many fine-grained experts (default 4 layers of 64
experts, top-8, 384 MiB of fp32 experts) is written once as an HF folder. Phase 1 loads it with
its experts left on disk and decodes under each policy, so the process's peak resident memory is
that of an offloaded run. Phase 2 loads it whole as well and times, interleaved round by round
(medians), the in-memory model and each policy over the same token stream, checking that every
offloaded step's logits equal the in-memory ones bit for bit.

The decode step: `moekit.generate` with its KV cache where this install has it; otherwise a
forward of the newest token alone (the expert traffic of one KV-cached decode step: one token, top-k
experts per layer; attention then sees only that token, so the tokens are not the model's real
continuation). `--cold` drops the checkpoint from the OS page cache before every offloaded run
(posix_fadvise), so reads come from the disk rather than from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.bench.timing import interleaved_medians
from moekit.inference.offload import OffloadConfig, attach, format_bytes
from moekit.interop.hf import from_hf
from moekit.io import write_json_atomic

POLICIES = ("lru", "lfu", "pinned", "auto")


def build(folder: Path, layers: int, experts: int, top_k: int, hidden: int, ff: int) -> None:
    from moekit.interop.tiny import tiny_model

    model = tiny_model(
        "qwen3_moe",
        seed=0,
        vocab_size=1024,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        intermediate_size=4 * hidden,
        moe_intermediate_size=ff,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )
    model.save_pretrained(folder, save_original_format=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode_steps():
    """(name, step) where step(model, token_ids) runs a decode over the tokens and returns logits."""
    try:
        from moekit.inference import generate  # noqa: F401  (KV-cached generation, where present)
    except ImportError:
        generate = None
    if generate is not None:

        def run(model, tokens):
            return generate(model, tokens[:, :1], max_new_tokens=tokens.shape[1] - 1)

        return "moekit.generate (KV cache)", run

    def run(model, tokens):
        outs = []
        with torch.no_grad():
            for t in range(tokens.shape[1]):
                outs.append(model(tokens[:, t : t + 1]).logits)
        return torch.cat(outs, dim=1)

    return "newest-token forwards", run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help="checkpoint folder (built if missing)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ff", type=int, default=256)
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    folder = args.folder or Path(tempfile.gettempdir()) / (
        f"moekit-offload-bench-{args.layers}x{args.experts}k{args.top_k}x{args.hidden}x{args.ff}"
    )
    if args.build_only:
        build(folder, args.layers, args.experts, args.top_k, args.hidden, args.ff)
        return
    if not (folder / "config.json").is_file():
        # in a child process, so that building does not count in this process's peak memory
        command = [sys.executable, __file__, "--build-only", "--folder", str(folder)]
        command += ["--layers", str(args.layers), "--experts", str(args.experts), "--top-k", str(args.top_k)]
        command += ["--hidden", str(args.hidden), "--ff", str(args.ff)]
        subprocess.run(command, check=True)

    decode_name, decode = decode_steps()
    tokens = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    configs = {f"{p}": OffloadConfig(budget_bytes=args.budget, policy=p) for p in POLICIES}
    configs["lru, no prefetch"] = OffloadConfig(budget_bytes=args.budget, policy="lru", prefetch=False)

    # Phase 1: experts on disk only, for the peak resident memory of an offloaded run
    rss_before = peak_rss_bytes()
    on_disk = from_hf(folder, experts_on_disk=True)
    reports = {}
    for name, config in configs.items():
        if args.cold:
            drop_page_cache(folder)
        with attach(on_disk, config) as handle:
            decode(on_disk, tokens)
        reports[name] = handle.report()
    rss_offloaded = peak_rss_bytes()

    # Phase 2: side by side with the whole model in memory
    in_memory = from_hf(folder)
    rss_in_memory = peak_rss_bytes()
    reference = decode(in_memory, tokens)
    identical = {}

    def timed_offload(name):
        def step() -> float:
            if args.cold:
                drop_page_cache(folder)
            with attach(on_disk, configs[name]) as handle:
                start = time.perf_counter()
                out = decode(on_disk, tokens)
                elapsed = time.perf_counter() - start
            identical[name] = identical.get(name, True) and torch.equal(out, reference)
            reports[name] = handle.report()
            return elapsed

        return step

    def timed_in_memory() -> float:
        start = time.perf_counter()
        decode(in_memory, tokens)
        return time.perf_counter() - start

    steps = {"in memory": timed_in_memory, **{name: timed_offload(name) for name in configs}}
    medians = interleaved_medians(steps, repeats=args.repeats, warmup=1)

    expert_bytes = reports["lru"]["expert_bytes"]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    result = {
        "decode": decode_name,
        "cold": args.cold,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "tokens": args.tokens,
        "expert_bytes": expert_bytes,
        "budget": args.budget,
        "peak_rss_bytes": {"before": rss_before, "offloaded": rss_offloaded, "with in-memory": rss_in_memory},
        "tokens_per_s": {name: args.tokens / seconds for name, seconds in medians.items()},
        "bit_identical": identical,
        "reports": reports,
    }
    print(f"{decode_name}, {args.tokens} tokens, experts {format_bytes(expert_bytes)}, budget {args.budget}")
    print(f"cpu: {cpu}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    print(
        f"peak RSS: {format_bytes(rss_before)} before loading, {format_bytes(rss_offloaded)} offloaded, "
        f"{format_bytes(rss_in_memory)} with the in-memory model loaded too"
    )
    header = "| mode | tokens/s | hit rate | Belady hit rate | MiB read/token | Belady MiB/token | peak MiB |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print(f"| in memory | {args.tokens / medians['in memory']:.1f} | | | | | {expert_bytes / 2**20:.0f} |")
    for name in configs:
        r = reports[name]
        print(
            f"| {name} | {args.tokens / medians[name]:.1f} | {r['hit_rate']:.3f} | "
            f"{r['belady_hit_rate']:.3f} | "
            f"{r['bytes_read_per_token'] / 2**20:.2f} | {r['belady_bytes_read_per_token'] / 2**20:.2f} | "
            f"{r['peak_resident_expert_bytes'] / 2**20:.0f} |"
        )
    print("bit-identical to in memory:", identical)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, json.loads(json.dumps(result)))


if __name__ == "__main__":
    main()
