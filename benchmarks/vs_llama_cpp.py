"""Decode speed of `moekit.generate` against llama.cpp on the same checkpoint, batch 1, each
engine in its own process.

    PYTHONPATH=<dir with llama_cpp> .venv/bin/python benchmarks/vs_llama_cpp.py \\
        --converter <llama.cpp source tree>/convert_hf_to_gguf.py --model large \\
        --outtype f32 bf16 q8_0 q4_0 --threads 1 2

llama.cpp is not a moekit dependency: its Python binding (`llama_cpp`, from the
`llama-cpp-python` package) must be importable, and its HF-to-GGUF converter is taken from a
llama.cpp source tree (the `llama-cpp-python` sdist vendors one under `vendor/llama.cpp`); the
converter runs in a subprocess and needs its own `gguf-py` (beside it), pyyaml and requests.

The checkpoint is `benchmarks/generate.py`'s random Qwen3-MoE (`tiny` or the ~1 GB `large`) without
attention biases (as real Qwen3-MoE; llama.cpp has no output-projection bias), saved once with a
64-token byte-level BPE tokenizer (the converter needs one; the prompts are token ids, so its
contents do not matter; vocab ids it lacks become padding entries). The converter cannot
recognise that tokenizer's pre-tokenizer, so it is told to write Qwen2's ("qwen2") instead.
`f32`, `bf16` and `q8_0` GGUFs come from the converter; `q4_0` is quantized from the F32 GGUF by
llama.cpp's own `llama_model_quantize` (Q4_0: 32-column blocks, which the 384-wide experts divide;
the K-quants need multiples of 256).

Every contender (an engine, a weight format, a thread count) is a worker process of its own that
loads its model once and then decodes on request; the parent asks one worker at a time, so two
engines never share an OpenMP runtime or run at once, and rounds are interleaved with a pause
before each request (idle OpenMP threads of the previous worker stop spinning). Decode tokens/s =
(N - 1) / (time from the first new token to the N-th), greedy, the same prompt ids everywhere,
medians of the rounds. (The file is not named `llama_cpp.py`: run as a script, it would shadow the
package it imports.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "RESULT "  # prefix of a worker's answer lines (anything else on its stdout is ignored)
PAUSE_SECONDS = 0.3  # before each request: the previous worker's OpenMP threads go to sleep

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

# Quantizes a GGUF with llama.cpp's own quantizer (argv: input, output, ftype constant name).
QUANTIZE = """
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = 1
status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if status else 0)
"""
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZED_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


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


def build(kind: str, folder: Path) -> int:
    """Saves `benchmarks/generate.py`'s checkpoint without attention biases, as real Qwen3-MoE has
    (llama.cpp's Qwen3-MoE graph has no output-projection bias and refuses such a file); returns
    its vocabulary size."""
    import transformers

    from moekit.interop.tiny import randomize_, tiny_config

    shape = load_generate_benchmark().LARGE if kind == "large" else {}
    config = tiny_config("qwen3_moe", **shape, attention_bias=False)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, seed=0).eval()
    hf.save_pretrained(folder)
    return config.vocab_size


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


def gguf(converter: Path, folder: Path, outtype: str) -> Path:
    """The checkpoint as a GGUF of `outtype` (converted, or quantized from the F32 one)."""
    out = folder / f"model-{outtype}.gguf"
    if out.exists():
        return out
    if outtype in QUANTIZED_TYPES:
        source = gguf(converter, folder, "f32")
        command = [sys.executable, "-c", QUANTIZE, str(source), str(out), QUANTIZED_TYPES[outtype]]
    else:
        command = [sys.executable, "-c", CONVERT, str(converter.parent), str(converter)]
        command += [str(folder), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# --- workers: one engine, one model, one thread count per process ---------------------------------


def moekit_worker(folder: Path, prompt: list[int], threads: int):
    from moekit.runtime import keep_freed_memory, tune_cpu_runtime

    tune_cpu_runtime()  # as `moekit generate` does, before torch is imported
    keep_freed_memory()
    import torch

    torch.set_num_threads(threads)
    from moekit.inference.generate import stream
    from moekit.interop.hf import from_hf

    model = from_hf(folder).eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def decode(n: int) -> tuple[list[int], float]:
        tokens, first = [], None
        for token in stream(model, ids, mask, max_new_tokens=n):
            tokens.append(int(token[0]))
            first = time.perf_counter() if first is None else first
        return tokens, time.perf_counter() - first

    info = {"bytes_per_token": load_generate_benchmark().bytes_per_token(model)}
    return decode, info


def llama_worker(path: Path, prompt: list[int], threads: int, new_tokens: int):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=len(prompt) + new_tokens + 8,
        n_batch=len(prompt),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,  # fills `scores`, read for greedy picks; decode steps have one row anyway
        verbose=False,
    )

    def decode(n: int) -> tuple[list[int], float]:
        llm.reset()
        llm.eval(prompt)
        tokens, first = [], None
        for i in range(n):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            first = time.perf_counter() if first is None else first
            if i < n - 1:
                llm.eval([tokens[-1]])
        return tokens, time.perf_counter() - first

    return decode, {"gguf_bytes": path.stat().st_size}


def serve(args) -> None:
    """Worker loop: after loading, answer each stdin line N with the tokens of a greedy decode of
    N new tokens and the seconds from the first new token to the last (prefill left out)."""
    prompt = json.loads(args.prompt_ids)
    if args.worker == "moekit":
        decode, info = moekit_worker(args.folder, prompt, args.threads[0])
    else:
        decode, info = llama_worker(args.folder, prompt, args.threads[0], args.new_tokens)
    decode(args.new_tokens)  # warm-up
    print(RESULT + json.dumps(info), flush=True)
    for line in sys.stdin:
        tokens, seconds = decode(int(line))
        print(RESULT + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


class Worker:
    """A contender's process; `ask(n)` runs one decode of n tokens in it."""

    def __init__(self, engine: str, model: Path, threads: int, prompt: list[int], new_tokens: int):
        command = [sys.executable, __file__, "--worker", engine, "--folder", str(model)]
        command += ["--threads", str(threads), "--prompt-ids", json.dumps(prompt)]
        command += ["--new-tokens", str(new_tokens)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process = subprocess.Popen(command, env=env, **pipes)
        self.info = self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise RuntimeError(f"worker {self.process.args[3]} ended (status {self.process.wait()})")

    def ask(self, n: int) -> dict:
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def run(args, folder: Path) -> dict:
    from moekit.bench.timing import interleaved_medians

    vocab = build(args.model, folder)
    save_tokenizer(folder)
    paths = {outtype: gguf(args.converter, folder, outtype) for outtype in args.outtype}
    import torch

    prompt = torch.randint(3, vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    contenders = {}
    for threads in args.threads:
        contenders[f"moekit fp32/{threads}"] = ("moekit", folder, threads)
        for outtype, path in paths.items():
            contenders[f"llama.cpp {outtype.upper()}/{threads}"] = ("llama", path, threads)
    workers = {}
    try:
        for name, (engine, model, threads) in contenders.items():
            workers[name] = Worker(engine, model, threads, prompt, args.new_tokens)
        tokens: dict[str, list[int]] = {}

        def step(name: str):
            def timed() -> float:
                time.sleep(PAUSE_SECONDS)
                answer = workers[name].ask(args.new_tokens)
                tokens[name] = answer["tokens"]
                return answer["seconds"]

            return timed

        steps = {name: step(name) for name in contenders}
        medians = interleaved_medians(steps, repeats=args.repeats, warmup=0)
    finally:
        for worker in workers.values():
            worker.close()
    rows = []
    reference = tokens[f"moekit fp32/{args.threads[0]}"]
    for name in contenders:
        engine, threads = name.split("/")
        rows.append(
            {
                "engine": engine,
                "threads": int(threads),
                "tokens_per_s": (args.new_tokens - 1) / medians[name],
                "greedy_tokens_agreeing_with_moekit": sum(
                    a == b for a, b in zip(reference, tokens[name], strict=True)
                ),
                **{k: v for k, v in workers[name].info.items() if k == "gguf_bytes"},
            }
        )
    results = {"model": args.model, "new_tokens": args.new_tokens, "rows": rows}
    results["bytes_per_token_fp32"] = workers[f"moekit fp32/{args.threads[0]}"].info["bytes_per_token"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--model", choices=["tiny", "large"], default="tiny")
    parser.add_argument("--outtype", nargs="+", default=["f32"], choices=[*CONVERTER_TYPES, *QUANTIZED_TYPES])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=["moekit", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        serve(args)
        return
    if args.converter is None:
        print("--converter: required (llama.cpp's convert_hf_to_gguf.py)", file=sys.stderr)
        raise SystemExit(2)
    problem = missing(args.converter)
    if problem is not None:
        print(problem, file=sys.stderr)
        raise SystemExit(2)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    from moekit.bench.machine import cpu_description

    results["cpu"] = cpu_description()
    results["load_before_after"] = [load, os.getloadavg()]
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
