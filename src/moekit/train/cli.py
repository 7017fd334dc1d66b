"""`moekit train` and `moekit eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.errors import MoekitError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML run config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=50 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from a checkpoint (default: the run's latest)",
    )


def train_main(args: argparse.Namespace) -> int:
    """Train; under torchrun (WORLD_SIZE > 1) every process runs this and they train as one run."""
    from moekit.distributed.mesh import init_from_environment
    from moekit.preflight import require_writable_dir
    from moekit.train.config import RunConfig
    from moekit.train.trainer import Trainer

    config = RunConfig.load(args.config, args.overrides)
    require_writable_dir(Path(config.out_dir), "out_dir")
    joined = init_from_environment()
    try:
        trainer = Trainer(config)
        if args.resume is not None:
            trainer.resume(Path(config.out_dir) if args.resume == "latest" else Path(args.resume))
        result = trainer.run()
        if trainer.mesh.is_main:
            summary = {
                "out_dir": str(result.out_dir),
                "steps": result.steps,
                "val_loss": result.val_loss,
                "tokens_per_s": result.tokens_per_s,
                "parameters": result.parameters,
            }
            print(json.dumps(summary, indent=2))
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory or a run directory")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--batches", type=int, default=0, help="batches per domain (0: all)")
    parser.add_argument("--data", default=None, help="corpus source (default: the one the run trained on)")
    from moekit.device import add_device_arguments

    add_device_arguments(parser)


def eval_main(args: argparse.Namespace) -> int:
    from moekit.compress.storage import is_packed_directory, load_packed, packed_run_state
    from moekit.data.lmdata import prepare_data
    from moekit.device import resolve_device, resolve_dtype, warn_if_slow_bf16
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.train.checkpoint import load_checkpoint, read_checkpoint_state
    from moekit.train.trainer import evaluate

    packed = is_packed_directory(args.checkpoint)  # quantized experts in moekit's packed form
    state = packed_run_state(args.checkpoint) if packed else read_checkpoint_state(args.checkpoint)
    try:
        config = state["config"]
        model_config = LMConfig.from_dict(config["model"])
        data_config = config["data"]
    except KeyError as exc:
        raise MoekitError(f"{args.checkpoint}: checkpoint state has no {exc} entry") from None
    if packed:
        model = load_packed(args.checkpoint)[0]
    else:
        model = LanguageModel(model_config)
        load_checkpoint(args.checkpoint, model, restore_rng=False)
    device, dtype = resolve_device(args.device, "--device"), resolve_dtype(args.dtype, "--dtype")
    warn_if_slow_bf16(dtype, device)
    model.to(device)
    data = prepare_data(
        args.data or data_config["source"],
        tokenizer=data_config["tokenizer"],
        bpe_vocab_size=data_config["bpe_vocab_size"],
        holdout=data_config.get("holdout"),
        cache_dir=Path(data_config["cache_dir"]) if data_config.get("cache_dir") else None,
    )
    losses = evaluate(
        model,
        data,
        data_config["seq_len"],
        batch_size=8,
        split=args.split,
        max_batches=args.batches or None,
        layout=data_config["layout"],
        dtype=dtype,
    )
    print(json.dumps({"step": state.get("step"), "split": args.split, "loss": losses}, indent=2))
    return 0
