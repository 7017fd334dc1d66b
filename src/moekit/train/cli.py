"""`moekit train` and `moekit eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import MoekitError
from moekit.train.run_dir import existing_run, remove_previous_run

if TYPE_CHECKING:
    from moekit.train.config import RunConfig


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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in out_dir: its checkpoints/ and metrics.jsonl are removed once "
        "the new run is ready to start (without --overwrite or --resume, an out_dir that holds a run "
        "is refused)",
    )


def refuse_existing_run(out_dir: Path) -> None:
    found = existing_run(out_dir)
    if found:
        raise MoekitError(
            f"out_dir {out_dir}: already holds a run ({', '.join(found)}); pass --resume to continue "
            "it or --overwrite to replace it"
        )


def refuse_init_from_inside(config: RunConfig) -> None:
    """With --overwrite, `model.init_from` must not be a checkpoint of the run being replaced: it
    would be removed, and a later --resume rebuilds the model from it."""
    if config.init_from is None:
        return
    out_dir = Path(config.out_dir).resolve()
    start = Path(config.init_from).resolve()
    if start == out_dir or start.is_relative_to(out_dir / "checkpoints"):
        raise MoekitError(
            f"model.init_from {config.init_from}: a checkpoint of the run in out_dir {config.out_dir}, "
            "which --overwrite would remove; copy it elsewhere or choose another out_dir"
        )


def train_main(args: argparse.Namespace) -> int:
    """Train; under torchrun (WORLD_SIZE > 1) every process runs this and they train as one run."""
    from moekit.distributed.mesh import init_from_environment
    from moekit.preflight import require_writable_dir
    from moekit.train.config import RunConfig
    from moekit.train.trainer import Trainer

    if args.overwrite and args.resume is not None:
        raise MoekitError(
            "--overwrite and --resume: pass one of them (--resume continues the run in out_dir, "
            "--overwrite replaces it)"
        )
    config = RunConfig.load(args.config, args.overrides)
    out_dir = Path(config.out_dir)
    require_writable_dir(out_dir, "out_dir")
    if args.overwrite:
        refuse_init_from_inside(config)
    elif args.resume is None:
        refuse_existing_run(out_dir)  # before any work: nothing of that run is touched
    else:
        from moekit.train.checkpoint import resolve_checkpoint

        resolve_checkpoint(out_dir if args.resume == "latest" else Path(args.resume))  # exists?
    joined = init_from_environment()
    try:
        trainer = Trainer(config)  # data, model and init_from checked and loaded
        if args.resume is not None:
            trainer.resume(out_dir if args.resume == "latest" else Path(args.resume))
        else:
            if trainer.mesh.distributed:
                import torch.distributed as dist

                # every rank has checked out_dir before the main one writes (or removes) anything
                dist.barrier(group=trainer.mesh.world_group)
            if args.overwrite and trainer.mesh.is_main:
                remove_previous_run(out_dir)
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
    parser.add_argument(
        "--batches", type=int, default=0, metavar="N", help="batches per domain (default 0: all of them)"
    )
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

    if args.batches < 0:
        raise MoekitError(f"--batches: got {args.batches}, expected a positive integer (or 0: all batches)")
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
    if not losses:
        raise MoekitError(f"{args.data or data_config['source']}: no {args.split} text to evaluate on")
    print(json.dumps({"step": state.get("step"), "split": args.split, "loss": losses}, indent=2))
    return 0
