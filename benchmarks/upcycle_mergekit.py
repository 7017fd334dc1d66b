"""moekit upcycle vs mergekit-moe on the same dense Llama checkpoint: step-0 equivalence and build time.

    .venv/bin/python benchmarks/upcycle_mergekit.py --mergekit-moe PATH/TO/mergekit-moe \
        [--run runs/bench/upcycle/seed0/dense] --out runs/bench/upcycle_mergekit.json

mergekit is not a moekit dependency: install it into any environment and pass its
`mergekit-moe` executable. The dense model is a moekit run exported to HF Llama (`--run`), or a
tiny random Llama. Both tools build a 4-expert top-2 Mixtral with a random router from copies of
the dense FFN; the receipt's step-0 check (transformers on each output folder, float32) is then
applied to both outputs alike, on the built-in corpus's validation text.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from moekit.construct.hf import UpcycleRecipe, upcycle_hf
from moekit.construct.receipt import held_out_token_batches, step_zero
from moekit.io import write_json_atomic


def dense_folder(run: Path | None, work: Path) -> Path:
    folder = work / "dense"
    if run is not None:
        from moekit.construct.lm import load_run_model
        from moekit.interop.lm_hf import lm_to_hf

        model, _ = load_run_model(run)
        lm_to_hf(model, folder)
    else:
        from moekit.interop.tiny import tiny_dense_model

        tiny_dense_model("llama").save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def save_char_tokenizer(folder: Path) -> None:
    """A character tokenizer (id = code point, below the vocabulary size): mergekit-moe copies the
    base model's tokenizer and refuses a folder without one."""
    import json

    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    vocab = {chr(i): i for i in range(1, vocab_size)}
    vocab["<unk>"] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(str(folder))


def step0(dense: Path, moe: Path, source: str) -> dict[str, float]:
    import transformers

    def load(path: Path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, experts_implementation="eager"
        ).eval()

    a, b = load(dense), load(moe)
    batches, _ = held_out_token_batches(a.config.vocab_size, corpus=source)
    result = step_zero(lambda ids: a(input_ids=ids).logits, lambda ids: b(input_ids=ids).logits, batches)
    return result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit-moe", required=True, help="the mergekit-moe executable")
    parser.add_argument("--run", type=Path, help="a dense moekit run (default: a tiny random Llama)")
    parser.add_argument("--source", default="builtin")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/upcycle_mergekit.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="upcycle-mergekit-"))
    dense = dense_folder(args.run, work)
    start = time.perf_counter()
    upcycle_hf(dense, work / "moekit", UpcycleRecipe(4, 2, router="random"), corpus=args.source)
    moekit_seconds = time.perf_counter() - start
    config = work / "mergekit.yml"
    experts = "".join(f"  - source_model: {dense}\n" for _ in range(4))
    config.write_text(
        f"base_model: {dense}\ngate_mode: random\ndtype: float32\nexperts_per_token: 2\nexperts:\n{experts}"
    )
    start = time.perf_counter()
    subprocess.run(
        [
            args.mergekit_moe,
            str(config),
            str(work / "mergekit"),
            "--i-understand-this-is-not-useful-without-training",
        ],
        check=True,
        capture_output=True,
    )
    mergekit_seconds = time.perf_counter() - start
    report = {
        "dense": "moekit run " + str(args.run) if args.run else "tiny random Llama",
        "moekit": {"seconds_with_receipt": moekit_seconds, **step0(dense, work / "moekit", args.source)},
        "mergekit": {"seconds": mergekit_seconds, **step0(dense, work / "mergekit", args.source)},
    }
    write_json_atomic(args.out, report)
    for tool in ("moekit", "mergekit"):
        r = report[tool]
        seconds = r.get("seconds_with_receipt", r.get("seconds"))
        print(
            f"{tool}: max |dlogit| {r['max_abs_logit_diff']:.3g}, rel L2 {r['relative_l2']:.3g}, "
            f"loss {r['dense_loss']:.4f} -> {r['moe_loss']:.4f}, {seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
