"""`moekit convert`: HF checkpoint folders to moekit family checkpoints and back.

    moekit convert from-hf SRC DST      HF folder -> moekit family checkpoint
    moekit convert to-hf SRC DST        moekit family checkpoint (or HF folder) -> HF folder

`to-hf` also accepts an HF folder, which re-writes it in the other expert layout (`--layout`), and
a `moekit train` run or checkpoint, exported to the HF family that computes moekit's LM (Llama,
Mixtral or Qwen2-MoE, see `interop.lm_hf`).
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_direction", metavar="DIRECTION", required=True)
    from_hf = sub.add_parser("from-hf", help="an HF MoE checkpoint folder -> a moekit family checkpoint")
    to_hf = sub.add_parser(
        "to-hf", help="a moekit family checkpoint (or HF folder) -> an HF checkpoint folder"
    )
    for p in (from_hf, to_hf):
        p.add_argument("src", metavar="SRC", help="folder to read")
        p.add_argument("dst", metavar="DST", help="folder to write (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep their dtype)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    to_hf.add_argument(
        "--layout",
        choices=("per_expert", "packed"),
        help="expert tensors per expert (save_pretrained's default) or packed (transformers v5); "
        "default: the layout the model was read from",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from moekit.interop.hf import from_hf, load_any, save_family, to_hf

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.convert_direction == "from-hf":
        model = from_hf(args.src, dtype=dtype)
        out = save_family(model, args.dst, overwrite=args.overwrite)
    elif _is_run(args.src):
        return _export_run(args, dtype)
    else:
        model = load_any(args.src)
        out = to_hf(model, args.dst, layout=args.layout, dtype=dtype, overwrite=args.overwrite)
    config = model.config
    moe = config.moe
    print(
        f"{args.src} -> {out}: {config.family}, {config.num_layers} layers "
        f"({sum(config.moe_layers)} MoE, {moe.router.num_experts} experts top-{moe.router.top_k}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return 0


def _is_run(src: str) -> bool:
    from pathlib import Path

    from moekit.train.checkpoint import LATEST_FILE, STATE_FILE

    path = Path(src)
    return any(
        (base / name).is_file() for base in (path, path / "checkpoints") for name in (STATE_FILE, LATEST_FILE)
    )


def _export_run(args: argparse.Namespace, dtype) -> int:
    """A moekit run (its latest checkpoint) -> the HF family of its LM."""
    from moekit.construct.lm import load_run_model
    from moekit.errors import MoekitError
    from moekit.interop.lm_hf import hf_family_of, lm_to_hf

    if args.layout == "packed":
        raise MoekitError("--layout: runs are written with save_pretrained's default layout; omit --layout")
    model, state = load_run_model(args.src)
    if dtype is not None:
        model = model.to(dtype)
    family = hf_family_of(model.config)
    out = lm_to_hf(model, args.dst, overwrite=args.overwrite)
    print(
        f"{args.src} (step {state.get('step')}) -> {out}: {family}, {model.config.num_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return 0
