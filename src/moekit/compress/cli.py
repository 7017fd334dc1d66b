"""`moekit compress SRC --recipe R.yaml --calib corpus|PATH --out DST`.

SRC is a moekit checkpoint (or run directory) or an HF folder of a family `moekit.from_hf` loads.
DST is an HF folder of the same family (AutoModelForCausalLM loads it) for a `from_hf` model, or a
moekit checkpoint for moekit's own LM, with `compress_report.json` beside the weights and, for
quantization, the packed codes in `experts.quant.safetensors`. A recipe with `quantize.storage:
packed` writes moekit's packed format instead (`moekit.compress.storage`): only the packed experts,
which `moekit generate`, `eval` and `analyze` load and run. A recipe of method `premoe` also writes
the per-domain masks and retrieval keys (`premoe.safetensors`, `premoe.json`) that
`moekit generate --premoe` and `moekit eval-tasks --method premoe` apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="SRC", help="moekit checkpoint/run dir or HF folder")
    parser.add_argument("--recipe", type=Path, required=True, metavar="R.yaml", help="compression recipe")
    parser.add_argument(
        "--calib",
        default="corpus",
        metavar="corpus|PATH",
        help="calibration and held-out text: 'corpus' (the run's corpus), 'sample', 'builtin', or a "
        "folder/file of .txt/.jsonl (default corpus)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DST", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def main(args: argparse.Namespace) -> int:
    from moekit.compress.pipeline import REPORT_FILE, compress
    from moekit.compress.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    report = compress(args.source, recipe, args.calib, args.out, overwrite=args.overwrite)
    before, after = report["loss_before"]["all"], report["loss_after"]["all"]
    agreement = sum(report["router_topk_agreement"]) / max(len(report["router_topk_agreement"]), 1)
    print(
        f"{recipe.method}: experts/layer {report['experts_per_layer']['before']} -> "
        f"{report['experts_per_layer']['after']}, bytes {report['bytes_before']} -> {report['bytes_after']}, "
        f"held-out loss {before:.4f} -> {after:.4f}, top-k router agreement {agreement:.3f}"
    )
    if "padding" in report:
        padding = report["padding"]
        print(
            f"experts kept per layer {padding['experts_kept']}, stored padded to "
            f"{report['experts_per_layer']['after']} ({padding['mode']}: "
            f"{padding['padding_bytes']} bytes of padding)"
        )
    if "premoe" in report:
        retrieval = report["premoe"]["retrieval"]
        print(
            f"premoe: masks of {len(report['premoe']['domains'])} domains; retrieval names the held-out "
            f"rows' domain for {retrieval['accuracy']:.3f} of {retrieval['rows']} rows"
        )
    print(f"wrote {args.out} ({REPORT_FILE})")
    return 0
