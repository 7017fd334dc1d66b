"""`moekit upcycle SRC --experts N --top-k K [--method copy|drop|split] --out DST`."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="a dense HF model folder or a moekit run / checkpoint")
    parser.add_argument("--out", required=True, metavar="DST", help="folder to write (must not exist)")
    parser.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token")
    parser.add_argument(
        "--method", default="copy", choices=("copy", "drop", "split"),
        help="copy: sparse upcycling; drop: Drop-Upcycling; split: FFN neurons into fine-grained experts",
    )  # fmt: skip
    parser.add_argument(
        "--router", default="auto", choices=("auto", "random", "zero", "hidden"),
        help="router init (auto: random for copy/drop, zero for split); hidden: prompts' hidden states",
    )  # fmt: skip
    parser.add_argument(
        "--prompts", metavar="FILE", help="JSON list (one per expert) of lists of prompt texts"
    )
    parser.add_argument(
        "--drop-ratio", type=float, default=0.5, help="Drop-Upcycling's re-initialised fraction"
    )
    parser.add_argument("--noise", type=float, default=0.0, help="multiplicative noise std on expert weights")
    parser.add_argument(
        "--shared", action="store_true", help="add a shared expert (moekit runs, Qwen2 sources)"
    )
    parser.add_argument("--shared-fraction", type=float, default=0.25, help="split: neurons kept as shared")
    parser.add_argument("--partition", default="contiguous", choices=("contiguous", "random", "cluster"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus", help="corpus of the receipt's held-out text (default: builtin / the run's)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="HF sources: load and write in this dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def _prompts(path: str | None) -> list[list[str]] | None:
    from moekit.errors import MoekitError
    from moekit.io import read_json

    if path is None:
        return None
    data = read_json(Path(path), "prompts")
    if not isinstance(data, list) or not all(
        isinstance(g, list) and g and all(isinstance(t, str) for t in g) for g in data
    ):
        raise MoekitError(f"{path}: expected a JSON list of non-empty lists of strings, one per expert")
    return data


def main(args: argparse.Namespace) -> int:
    from moekit.construct.api import upcycle
    from moekit.construct.hf import UpcycleRecipe
    from moekit.construct.receipt import RECEIPT_FILE, summary
    from moekit.errors import ConfigError

    try:
        recipe = UpcycleRecipe(
            num_experts=args.experts,
            top_k=args.top_k,
            method=args.method,
            router=args.router,
            seed=args.seed,
            drop_ratio=args.drop_ratio,
            noise=args.noise,
            shared=args.shared,
            shared_fraction=args.shared_fraction,
            partition=args.partition,
        )
    except ConfigError as exc:  # the recipe's fields are the options' names (experts, top_k, ...)
        raise exc.renamed("--" + exc.field.replace("_", "-")) from None
    if args.corpus is not None:
        from moekit.data.build import check_source

        check_source(args.corpus, "--corpus")
    prompts = _prompts(args.prompts)
    dtype = None
    if args.dtype:
        import torch

        dtype = getattr(torch, args.dtype)
    receipt = upcycle(
        args.src, args.out, recipe, corpus=args.corpus, prompts=prompts, overwrite=args.overwrite, dtype=dtype
    )
    out = receipt["output"]
    print(
        f"{args.src} -> {args.out}: {receipt['source']['family']} -> {out['family']}, "
        f"{recipe.method}, {recipe.num_experts} experts top-{recipe.top_k}, router {recipe.router}"
    )
    print(summary(receipt))
    print(f"receipt: {Path(args.out) / RECEIPT_FILE}")
    return 0
