"""Decode speed of `moekit.generate` against transformers' `generate` on the same checkpoint.

    .venv/bin/python benchmarks/generate.py --model tiny --batch 1 8
    .venv/bin/python benchmarks/generate.py --model large --batch 1 8 --new-tokens 12

`tiny` is moekit's tiny random Qwen3-MoE; `large` is a random Qwen3-MoE-shaped model of ~1 GB in
fp32 (64 fine-grained experts of 1024 x 384, top-8, 3 layers, vocab 16k). Both sides load one saved
checkpoint; transformers runs each of its experts implementations (eager, grouped_mm, batched_mm).
Decode tokens/s is batch x (N - 1) / (time from the first new token to the N-th), each token's
arrival stamped as it comes (moekit's `stream`, transformers' streamer protocol), so prefill is left
out. (A difference of two runs, N tokens minus 1, gave negative rates where the prefill's time
varied more than the decode took.) Contenders run interleaved round by round after three warm-up
rounds (transformers' first calls are many times slower), medians reported.

Both engines run under OpenMP's own defaults, as transformers' users run it: moekit's
`tune_cpu_runtime` (a short `GOMP_SPINCOUNT`) is not applied; set `GOMP_SPINCOUNT` yourself to
compare under another setting (it is recorded). On a quiet machine it made no difference to either
engine (tiny, batch 1); on a loaded one transformers' two-thread steps wait on a descheduled
thread at every parallel region and lose most of their speed (BENCHMARKS.md §8), so a ratio taken
under load measures the load.

The physical limit at batch 1: a decoded token must read the dense weights once (attention,
norms, routers, the output head) and its top-k experts in every MoE layer; divided by the memory
bandwidth measured here (a sum over a 1 GB tensor), that is the fastest any engine can decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moekit.bench.machine import cpu_description
from moekit.bench.timing import interleaved_medians
from moekit.inference.generate import stream
from moekit.interop.hf import from_hf
from moekit.interop.tiny import randomize_, tiny_config
from moekit.runtime import keep_freed_memory

LARGE = dict(
    vocab_size=16384,
    hidden_size=1024,
    num_hidden_layers=3,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=3072,
    moe_intermediate_size=384,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    max_position_embeddings=4096,
)


def build(kind: str, folder: Path):
    import transformers

    config = tiny_config("qwen3_moe", **(LARGE if kind == "large" else {}))
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, seed=0).eval()
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, from_hf(folder).eval()


def memory_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a sum over a 1 GB fp32 tensor, all threads (median)."""
    data = torch.ones(256 * 1024 * 1024)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times[1:])


def bytes_per_token(model) -> int:
    """Weight bytes one decoded token reads at batch 1: every dense weight (the embedding: one row)
    and the top-k experts of every MoE layer."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed"):
            total += p.shape[1] * p.element_size()
        elif ".experts." in name:
            continue
        else:
            total += p.numel() * p.element_size()
    for moe in model.moe_layers:
        per_expert = sum(p[0].numel() * p.element_size() for p in moe.experts.parameters())
        total += moe.config.router.top_k * per_expert
    return total


class TokenClock:
    """A transformers streamer that stamps each new token's arrival: `generate` puts the prompt
    first, then each step's tokens."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def decode_seconds(arrivals: list[float], new_tokens: int) -> float:
    """Seconds from the first new token to the last: the N - 1 decode steps, prefill left out."""
    if len(arrivals) != new_tokens:
        raise SystemExit(f"expected {new_tokens} new tokens, got {len(arrivals)} (an early stop?)")
    return arrivals[-1] - arrivals[0]


def run(kind: str, batches: list[int], new_tokens: int, prompt: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(kind, Path(tmp))
    vocab = ours.config.vocab_size
    implementations = [i for i in ("eager", "grouped_mm", "batched_mm")]
    results = {"model": kind, "parameters": sum(p.numel() for p in ours.parameters()), "rows": []}
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)

        def moekit_step(ids=ids, mask=mask) -> float:
            arrivals = [time.perf_counter() for _ in stream(ours, ids, mask, max_new_tokens=new_tokens)]
            return decode_seconds(arrivals, new_tokens)

        def hf_step(implementation: str, ids=ids, mask=mask):
            def step() -> float:
                hf.set_experts_implementation(implementation)
                clock = TokenClock()
                with torch.no_grad():
                    hf.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        streamer=clock,
                    )
                return decode_seconds(clock.arrivals, new_tokens)

            return step

        steps = {"moekit": moekit_step}
        for implementation in implementations:
            steps[f"hf_{implementation}"] = hf_step(implementation)
        medians = interleaved_medians(steps, repeats=repeats, warmup=3)
        row = {"batch": batch}
        for name in steps:
            row[name] = batch * (new_tokens - 1) / medians[name]
        row["fastest_hf"] = max(implementations, key=lambda i: row[f"hf_{i}"])
        row["speedup_vs_fastest_hf"] = row["moekit"] / row[f"hf_{row['fastest_hf']}"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    results["bytes_per_token"] = bytes_per_token(ours)
    results["bandwidth"] = memory_bandwidth()
    results["limit_tokens_per_s"] = results["bandwidth"] / results["bytes_per_token"]
    batch1 = [r for r in results["rows"] if r["batch"] == 1]
    if batch1:
        results["batch1_fraction_of_limit"] = batch1[0]["moekit"] / results["limit_tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "large"], default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens: expected at least 2 (decode speed is timed between new tokens)")
    keep_freed_memory()
    results = run(args.model, args.batch, args.new_tokens, args.prompt, args.repeats)
    results["cpu"] = cpu_description()
    results["threads"] = torch.get_num_threads()
    results["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT", "libgomp default")
    results["load"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
