"""Decode speed of `moekit.generate` against llama.cpp on the same checkpoint, batch 1.

    PYTHONPATH=<dir with llama_cpp> .venv/bin/python benchmarks/vs_llama_cpp.py \\
        --converter <llama.cpp source tree>/convert_hf_to_gguf.py --model large --outtype f32 bf16

llama.cpp is not a moekit dependency: its Python binding (`llama_cpp`, from the
`llama-cpp-python` package) must be importable, and its HF-to-GGUF converter is taken from a
llama.cpp source tree (the `llama-cpp-python` sdist vendors one under `vendor/llama.cpp`); the
converter runs in a subprocess and needs its own `gguf-py` (beside it), pyyaml and requests.

The checkpoint is `benchmarks/generate.py`'s random Qwen3-MoE (`tiny` or the ~1 GB `large`) without
attention biases (as real Qwen3-MoE; llama.cpp has no output-projection bias), saved
once with a 64-token byte-level BPE tokenizer (the converter needs one; the prompts are token ids,
so its contents do not matter; vocab ids it lacks become padding entries). The converter cannot
recognise that tokenizer's pre-tokenizer, so it is told to write Qwen2's ("qwen2") instead.
Each GGUF (one per `--outtype`) is loaded with n_threads = torch's thread count. Decode
tokens/s = (N - 1) / (time for N new tokens - time for 1), greedy, the same prompt ids on both
sides, contenders interleaved round by round, medians reported. Caveat: in one process the two
engines share one OpenMP runtime and slow each other (see BENCHMARKS.md, section 8, "Beside
llama.cpp"); for absolute figures time each engine in its own process. (The file is not named
`llama_cpp.py`: run as a script, it would shadow the package it imports.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moekit.runtime import keep_freed_memory, tune_cpu_runtime

tune_cpu_runtime()  # as `moekit generate` does, before torch is imported

import torch  # noqa: E402

from moekit.bench.timing import interleaved_medians  # noqa: E402
from moekit.inference.generate import generate  # noqa: E402

HERE = Path(__file__).resolve().parent

# Runs the converter with its tokenizer-recognition step answered "qwen2" (our random tokenizer
# has no entry in its table of known pre-tokenizers).
CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[1] + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def missing(converter: Path) -> str | None:
    """One line naming what is missing, or None when everything needed is there."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not importable: install llama-cpp-python (it builds llama.cpp)"
    if not converter.is_file():
        return f"--converter: {converter} is not a file, expected llama.cpp's convert_hf_to_gguf.py"
    if not (converter.parent / "gguf-py").is_dir():
        return f"--converter: no gguf-py folder beside {converter}, expected a llama.cpp source tree"
    for module in ("yaml", "requests"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable: llama.cpp's converter needs it"
    return None


def load_generate_benchmark():
    spec = importlib.util.spec_from_file_location("generate_benchmark", HERE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(generate_benchmark, kind: str, folder: Path):
    """`benchmarks/generate.py`'s checkpoint without attention biases, as real Qwen3-MoE has:
    llama.cpp's Qwen3-MoE graph has no output-projection bias and refuses such a file."""
    import transformers

    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import randomize_, tiny_config

    shape = generate_benchmark.LARGE if kind == "large" else {}
    config = tiny_config("qwen3_moe", **shape, attention_bias=False)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, seed=0).eval()
    hf.save_pretrained(folder)
    return from_hf(folder).eval()


def save_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer (the converter reads one; its contents are irrelevant)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=64, show_progress=False)  # below the tiny model's 128
    tokenizer.train_from_iterator(["mixture of experts " * 50, "decode tokens per second " * 50], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)


def convert(converter: Path, folder: Path, outtype: str) -> Path:
    out = folder / f"model-{outtype}.gguf"
    command = [sys.executable, "-c", CONVERT, str(converter.parent), str(converter)]
    command += [str(folder), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def run(args, folder: Path) -> dict:
    import numpy as np
    from llama_cpp import Llama

    generate_benchmark = load_generate_benchmark()
    threads = torch.get_num_threads()
    results = {"model": args.model, "threads": threads, "gguf_bytes": {}}
    ours = build(generate_benchmark, args.model, folder)
    save_tokenizer(folder)
    engines = {}
    for outtype in args.outtype:
        path = convert(args.converter, folder, outtype)
        results["gguf_bytes"][outtype] = path.stat().st_size
        engines[outtype] = Llama(
            model_path=str(path),
            n_ctx=args.prompt + args.new_tokens + 8,
            n_batch=args.prompt,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,  # fills `scores`, read for greedy picks; decode steps have one row anyway
            verbose=False,
        )
    vocab = ours.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    prompt = ids[0].tolist()

    def moekit_step(n: int):
        def step() -> float:
            start = time.perf_counter()
            generate(ours, ids, mask, max_new_tokens=n)
            return time.perf_counter() - start

        return step

    def llama_decode(llm, n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for i in range(n):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if i < n - 1:
                llm.eval([tokens[-1]])
        return tokens

    def llama_step(llm, n: int):
        def step() -> float:
            start = time.perf_counter()
            llama_decode(llm, n)
            return time.perf_counter() - start

        return step

    steps = {}
    for n in (1, args.new_tokens):
        steps[f"moekit/{n}"] = moekit_step(n)
        for outtype, llm in engines.items():
            steps[f"llama.cpp {outtype}/{n}"] = llama_step(llm, n)
    medians = interleaved_medians(steps, repeats=args.repeats, warmup=1)
    row = {}
    for name in ["moekit"] + [f"llama.cpp {o}" for o in engines]:
        row[name] = (args.new_tokens - 1) / (medians[f"{name}/{args.new_tokens}"] - medians[f"{name}/1"])
    results["tokens_per_s"] = row
    # Same model on both sides: how many of the greedy tokens llama.cpp picks agree with moekit's.
    ours_tokens = generate(ours, ids, mask, max_new_tokens=args.new_tokens)[0, args.prompt :].tolist()
    results["greedy_tokens_agreeing"] = {
        outtype: sum(a == b for a, b in zip(ours_tokens, llama_decode(llm, args.new_tokens), strict=True))
        for outtype, llm in engines.items()
    }
    results["bytes_per_token_fp32"] = generate_benchmark.bytes_per_token(ours)
    results["bandwidth"] = generate_benchmark.memory_bandwidth()
    results["limit_tokens_per_s_fp32"] = results["bandwidth"] / results["bytes_per_token_fp32"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--converter", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--model", choices=["tiny", "large"], default="tiny")
    parser.add_argument("--outtype", nargs="+", default=["f32"], choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    problem = missing(args.converter)
    if problem is not None:
        print(problem, file=sys.stderr)
        raise SystemExit(2)
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    results["cpu"] = platform.processor() or "unknown"
    results["load"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
