"""`moekit analyze CKPT [--data corpus|PATH] --out DIR`: the routing-health report of a model.

CKPT is a moekit checkpoint (or a run directory with a `latest` pointer), a Hugging Face model
directory (config.json, no moekit state.json; loaded with `moekit.interop.from_hf`), or a saved
routing trace (trace.json). Writes DIR/report.html (self-contained), DIR/metrics.json and the
trace under DIR/trace/ (reload it with `moekit.analysis.load_trace`, or analyse it again by
passing that directory as CKPT). `--compare CKPT2` records a second model on the same batches and
adds routing drift.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError

DEFAULT_BATCHES = 20
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, metavar="CKPT", help="moekit checkpoint or run dir, HF dir, or trace"
    )
    parser.add_argument(
        "--data",
        default="corpus",
        metavar="corpus|PATH",
        help="'corpus' (the run's corpus, validation split; default), 'sample', 'builtin', a corpus "
        "directory, a .jsonl/.txt file or a directory of them",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument("--batches", type=int, default=DEFAULT_BATCHES, metavar="N", help="batches to record")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="S",
        help=f"default: the run's data.seq_len, else min(model max, {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument(
        "--compare", type=Path, default=None, metavar="CKPT2", help="second model: routing drift"
    )
    parser.add_argument("--scores", action="store_true", help="also keep every token's full score vector")
    parser.add_argument(
        "--no-super-experts",
        action="store_true",
        help="skip the expert output magnitudes (one extra expert pass)",
    )
    parser.add_argument(
        "--segment-lengths",
        default="4,16,64",
        metavar="L,L,...",
        help="window lengths for SRP/SCH local routing consistency (default 4,16,64)",
    )
    from moekit.device import add_device_arguments

    add_device_arguments(parser)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise MoekitError(f"--{name}: got {value}, expected a positive integer")
    return value


def _require_one_sequence(source: Any, batches: list[Any], seq_len: int) -> None:
    """Refuse data shorter than one sequence (an empty file still gives its document markers):
    its routing statistics would be those of a couple of tokens, NMI undefined."""
    if not all(hasattr(batch, "num_tokens") for batch in batches):
        return
    tokens = sum(int(batch.num_tokens) for batch in batches)
    if tokens < seq_len:
        raise MoekitError(
            f"{source}: only {tokens} tokens of data, fewer than one sequence ({seq_len} tokens, "
            "--seq-len); give more text or a smaller --seq-len"
        )


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise MoekitError(f"--segment-lengths: got {text!r}, expected positive integers separated by commas")
    return values


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def load_moekit_model(path: Path) -> tuple[Any, dict[str, Any], Path]:
    """(LanguageModel, the run's data config, the checkpoint directory) from a moekit checkpoint."""
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.train.checkpoint import STATE_FILE, load_checkpoint, read_checkpoint_state, resolve_checkpoint

    directory = resolve_checkpoint(path)
    state = read_checkpoint_state(directory)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise MoekitError(
            f"{directory / STATE_FILE}: expected config.model (the run config written by moekit train)"
        )
    model = LanguageModel(LMConfig.from_dict(config["model"]))
    load_checkpoint(directory, model, restore_rng=False)
    model.checkpoint_path = str(directory)  # where offloading reads the experts back from
    data_config = config.get("data") if isinstance(config.get("data"), dict) else {}
    return model, data_config, directory


def _from_hf_function(path: Path) -> Any:
    """`moekit.interop.from_hf` (or `moekit.interop.hf.from_hf`), imported only when needed."""
    import importlib

    problems = []
    for module_name in ("moekit.interop", "moekit.interop.hf"):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(str(exc))
            continue
        function = getattr(module, "from_hf", None)
        if callable(function):
            return function
        problems.append(f"{module_name} has no from_hf")
    raise MoekitError(
        f"{path}: a Hugging Face checkpoint, but HF interop (moekit.interop.from_hf) is not available in "
        f"this install ({'; '.join(problems)})"
    )


def load_hf_model(path: Path, experts_on_disk: bool = False) -> Any:
    """An HF checkpoint as a moekit-family model whose MoE FFNs are moekit MoE layers (with
    `experts_on_disk`, the routed experts left unread for offloading to stream)."""
    from torch import nn

    from_hf = _from_hf_function(path)
    loaded = from_hf(path, experts_on_disk=True) if experts_on_disk else from_hf(path)
    if isinstance(loaded, (tuple, list)) and loaded and isinstance(loaded[0], nn.Module):
        loaded = loaded[0]
    model = loaded if isinstance(loaded, nn.Module) else getattr(loaded, "model", None)
    if not isinstance(model, nn.Module):
        raise MoekitError(
            f"{path}: moekit.interop.from_hf returned {type(loaded).__name__}, expected a model"
        )
    return model


class LoadedModel:
    """A model ready to record, with what is needed to tokenise data for it."""

    def __init__(self, path: Path, experts_on_disk: bool = False) -> None:
        from moekit.analysis.data import HFTokenizer, checkpoint_tokenizer

        self.path = path
        from moekit.compress.storage import is_packed_directory

        if is_packed_directory(path):  # moekit's packed quantized experts (moekit compress)
            if experts_on_disk:
                raise MoekitError(
                    f"{path}: packed quantized experts are not streamed from disk (no offloading)"
                )
            from moekit.compress.storage import load_for_use

            for key, value in load_for_use(path).items():
                setattr(self, key, value)
        elif is_hf_directory(path):
            self.model = load_hf_model(path, experts_on_disk)
            self.tokenizer = HFTokenizer(path)
            self.data_config: dict[str, Any] = {}
            self.layout = "padded"  # no document-aware attention: one document piece per row
            self.max_seq_len = None
            self.kind = "hf"
        else:
            self.model, self.data_config, directory = load_moekit_model(path)
            self.tokenizer = checkpoint_tokenizer(directory, self.data_config)
            self.layout = "packed"
            self.max_seq_len = self.model.config.max_seq_len
            self.kind = "moekit"
            vocab = self.model.config.vocab_size
            if self.tokenizer.vocab_size > vocab:
                raise MoekitError(
                    f"{directory}: the tokenizer has {self.tokenizer.vocab_size} ids but the model's "
                    f"vocab_size is {vocab}"
                )


def record_models(args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any] | None]:
    """Record CKPT (and --compare) on the analysis batches; save the traces under `out`."""
    import torch

    from moekit.analysis.data import analysis_batches
    from moekit.analysis.drift import routing_drift
    from moekit.analysis.recorder import record_routing

    torch.manual_seed(0)
    loaded = LoadedModel(args.checkpoint)
    trained_len = loaded.data_config.get("seq_len")
    if args.seq_len is not None:
        seq_len = args.seq_len
    else:
        seq_len = trained_len or min(loaded.max_seq_len or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    _positive("seq-len", seq_len)
    if loaded.max_seq_len is not None and seq_len > loaded.max_seq_len:
        raise MoekitError(f"--seq-len: got {seq_len}, the model's max_seq_len is {loaded.max_seq_len}")
    data = analysis_batches(
        args.data,
        loaded.tokenizer,
        batch_size=args.batch_size,
        seq_len=seq_len,
        num_batches=args.batches,
        layout=loaded.layout,
        data_config=loaded.data_config,
    )
    _require_one_sequence(args.data, data.batches, seq_len)
    options = dict(
        scores=args.scores, expert_activations=not args.no_super_experts, domain_names=data.domain_names
    )
    meta = {"source": str(args.checkpoint), "model_kind": loaded.kind, "data": data.description}
    forward = placed_forward(args, loaded.model)
    options["forward"] = forward
    trace = record_routing(loaded.model, data.batches, meta=meta, **options)
    trace.save(out / "trace")
    if args.compare is None:
        return trace, None
    other = LoadedModel(args.compare)
    other_meta = {**meta, "source": str(args.compare), "model_kind": other.kind}
    options["forward"] = placed_forward(args, other.model)
    other_trace = record_routing(other.model, data.batches, meta=other_meta, **options)
    other_trace.save(out / "trace-compare")
    return trace, routing_drift(trace, other_trace)


def placed_forward(args: argparse.Namespace, model: Any) -> Any:
    """Move `model` to `--device` and return the recorder's forward that runs each batch there, in
    `--dtype` (the routing is recorded from the device's tensors either way)."""
    import torch

    from moekit.analysis.recorder import default_forward
    from moekit.device import autocast, resolve_device, resolve_dtype, warn_if_slow_bf16

    device = resolve_device(getattr(args, "device", "cpu"), "--device")
    dtype = resolve_dtype(getattr(args, "dtype", "fp32"), "--dtype")
    warn_if_slow_bf16(dtype, device)
    model.to(device)

    def forward(model: Any, batch: Any) -> Any:
        if isinstance(batch, dict):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        elif hasattr(batch, "to"):
            batch = batch.to(device)
        with autocast(device, dtype):
            return default_forward(model, batch)

    return forward


def main(args: argparse.Namespace) -> int:
    from moekit.analysis.drift import routing_drift
    from moekit.analysis.health import HealthOptions, json_ready, routing_health
    from moekit.analysis.report import render_report, routing_health_sections
    from moekit.analysis.trace import is_trace_dir, load_trace
    from moekit.io import write_json_atomic

    started = time.perf_counter()
    options = HealthOptions(segment_lengths=_lengths(args.segment_lengths))
    _positive("batches", args.batches)
    _positive("batch-size", args.batch_size)
    if args.seq_len is not None:
        _positive("seq-len", args.seq_len)
    out = Path(args.out)
    if is_trace_dir(args.checkpoint):
        trace, drift = load_trace(args.checkpoint), None
        if args.compare is not None:
            if not is_trace_dir(args.compare):
                raise MoekitError(
                    f"--compare {args.compare}: with a trace as CKPT, expected a trace directory too"
                )
            drift = routing_drift(trace, load_trace(args.compare))
    else:
        trace, drift = record_models(args, out)
    health = routing_health(trace, options)
    write_json_atomic(out / "metrics.json", json_ready({**health, "source": trace.meta, "drift": drift}))
    source = trace.meta.get("source", str(args.checkpoint))
    subtitle = f"{source} · {trace.meta.get('data', 'recorded data')} · {trace.num_tokens} tokens"
    sections = routing_health_sections(trace, health, drift)
    render_report(sections, out / "report.html", title="moekit routing report", subtitle=subtitle)
    summary = health["summary"]
    elapsed = time.perf_counter() - started
    print(
        f"analyzed {trace.num_tokens} tokens through {trace.num_layers} MoE layers in {elapsed:.1f}s: "
        f"mean domain NMI {summary['mean_domain_nmi']:.3f}, max load CV {summary['max_load_cv']:.3f}, "
        f"dead experts {summary['dead_experts']}"
    )
    print(f"wrote {out / 'report.html'} and {out / 'metrics.json'}")
    return 0
