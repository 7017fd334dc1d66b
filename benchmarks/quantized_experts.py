"""Resident memory and speed of packed quantized experts against the float model they come from.

    .venv/bin/moekit train --config configs/tiny-moe.yaml --set out_dir=runs/compress-bench
    .venv/bin/python benchmarks/quantized_experts.py runs/compress-bench --out runs/bench/quantized.json

The routed experts of the trained model are quantized (GPTQ with affinity-weighted Hessians, groups
of 32) at 4 bits and at a mean of 2.5 bits (MC-MoE allocation from {2, 3, 4, 8}); each is written
in moekit's packed format, the float model as a moekit checkpoint. Then:
- resident memory: each folder loaded in a fresh process; the increase of the process's RSS over
  the load (the model class is built once on the meta device first, so imports and first-use state
  stay outside the delta), and the bytes of parameters and buffers;
- speed, in one process, the three models side by side (rounds interleaved, medians): greedy
  decode at batch 1 (seconds per token, prefill excluded: (time for N tokens - time for 1) /
  (N - 1)) and one forward of a B x S batch (per token);
- that the packed models compute what their fake-quantized (float) versions compute: the largest
  logit difference on a held-out batch, in float32 and in float64.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from moekit.runtime import tune_cpu_runtime

tune_cpu_runtime()  # as `moekit generate` does, before torch is imported

import torch  # noqa: E402

from moekit.analysis.cli import LoadedModel, load_moekit_model  # noqa: E402
from moekit.analysis.data import analysis_batches  # noqa: E402
from moekit.bench.timing import interleaved_medians  # noqa: E402
from moekit.compress.calibrate import calibrate  # noqa: E402
from moekit.compress.quantize_model import quantize_model  # noqa: E402
from moekit.compress.recipe import QuantizeRecipe  # noqa: E402
from moekit.compress.storage import load_packed, resident_bytes, save_packed  # noqa: E402
from moekit.inference.generate import generate  # noqa: E402
from moekit.io import write_json_atomic  # noqa: E402
from moekit.train.checkpoint import read_checkpoint_state, resolve_checkpoint, save_checkpoint  # noqa: E402

MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from moekit.analysis.cli import load_moekit_model
from moekit.compress.storage import load_packed, resident_bytes, rss_bytes
from moekit.models.lm import LanguageModel, LMConfig
config = json.loads(sys.argv[3])
with torch.device("meta"):
    LanguageModel(LMConfig.from_dict(config))
before = rss_bytes()
model = (load_packed if sys.argv[1] == "packed" else load_moekit_model)(Path(sys.argv[2]))[0]
delta = rss_bytes() - before
print(json.dumps({"rss_delta": delta, **resident_bytes(model)}))
"""


def memory(kind: str, folder: Path, config: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, kind, str(folder), json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/quantized.json"))
    parser.add_argument("--calib-batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = LoadedModel(args.run)
    model = loaded.model.float().eval()
    data = analysis_batches(
        "corpus", loaded.tokenizer, batch_size=args.batch_size, seq_len=args.seq_len,
        num_batches=args.calib_batches + 1, layout=loaded.layout, data_config=loaded.data_config,
    )  # fmt: skip
    with torch.no_grad():
        calibration = calibrate(model, data.batches[: args.calib_batches], hessians=True)
        recipes = {
            "packed 4-bit": QuantizeRecipe(bits=4, group_size=32),
            "packed 2.5-bit mean": QuantizeRecipe(
                bits=None, mean_bits=2.5, choices=(2, 3, 4, 8), group_size=32
            ),
        }
        results = {name: quantize_model(model, calibration, recipe) for name, recipe in recipes.items()}
    run_state = read_checkpoint_state(resolve_checkpoint(args.run))
    config = model.config.to_dict()
    report: dict = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "memory": {},
        "bits": {name: r.bits for name, r in results.items()},
    }
    held_out = data.batches[-1].input_ids
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"float": Path(tmp) / "float"}
        save_checkpoint(folders["float"], model, None, {"config": run_state["config"], "step": 0})
        for name, result in results.items():
            folders[name] = Path(tmp) / name.replace(" ", "-")
            folders[name].mkdir()
            save_packed(result.packed_model(), folders[name], extra={"run_config": run_state["config"]})
        for name, folder in folders.items():
            report["memory"][name] = memory("float" if name == "float" else "packed", folder, config)
            print(name, report["memory"][name], flush=True)
        models = {"float": load_moekit_model(folders["float"])[0].eval()}
        models.update({name: load_packed(folders[name])[0] for name in results})
    with torch.no_grad():
        report["equality"] = {}
        for name, result in results.items():
            fake, packed = result.model, models[name]
            diff32 = (fake(held_out).logits - packed(held_out).logits).abs().max()
            diff64 = (fake.double()(held_out).logits - packed.double()(held_out).logits).abs().max()
            fake.float(), packed.float()
            report["equality"][name] = {"float32": float(diff32), "float64": float(diff64)}
        print("max |logit difference| packed vs fake-quant:", report["equality"], flush=True)
        prompt = held_out[:1, :32]

        def decode(m):
            def step():
                import time

                start = time.perf_counter()
                generate(m, prompt, max_new_tokens=1)
                one = time.perf_counter() - start
                start = time.perf_counter()
                generate(m, prompt, max_new_tokens=args.new_tokens)
                return (time.perf_counter() - start - one) / (args.new_tokens - 1)

            return step

        def prefill(m):
            def step():
                import time

                start = time.perf_counter()
                m(held_out)
                return (time.perf_counter() - start) / held_out.numel()

            return step

        report["decode_seconds_per_token"] = interleaved_medians(
            {name: decode(m) for name, m in models.items()}, args.repeats, 1
        )
        report["prefill_seconds_per_token"] = interleaved_medians(
            {name: prefill(m) for name, m in models.items()}, args.repeats, 1
        )
        report["dequantize_buffers"] = {n: resident_bytes(m)["dequantize_buffers"] for n, m in models.items()}
    speeds = ("decode_seconds_per_token", "prefill_seconds_per_token")
    print(json.dumps({k: report[k] for k in speeds}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
