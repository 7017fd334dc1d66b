"""`moekit generate SRC --prompt TEXT`: run a moekit checkpoint (or run directory) or an HF folder.

Tokens are printed as they are decoded; `--json OUT` also writes the prompt, the output ids, the
text, the decode speed and the experts each MoE layer chose for every generated token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, MoekitError

OFFLOAD_POLICIES = ("lru", "lfu", "pinned", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="SRC", help="moekit checkpoint or run dir, or HF folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="random seed of sampling")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result as JSON")
    parser.add_argument(
        "--offload-budget",
        default=None,
        metavar="SIZE",
        help="stream experts from disk within SIZE (2GB, 25%%)",
    )
    parser.add_argument("--offload-policy", default="auto", choices=OFFLOAD_POLICIES)
    parser.add_argument("--quiet", action="store_true", help="do not print the tokens")
    parser.add_argument(
        "--premoe",
        action="store_true",
        help="apply the PreMoe mask of the prompt's domain (retrieved from the masks stored with SRC)",
    )
    from moekit.device import add_device_arguments
    from moekit.inference.methods.cli import add_odp_arguments

    add_odp_arguments(parser, threshold=None)
    add_device_arguments(parser)


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    from moekit.inference.generate import GenerationConfig

    sample = args.temperature is not None or args.top_k > 0 or args.top_p < 1.0
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        GenerationConfig(**options)
    except ConfigError as exc:
        raise exc.renamed("--" + exc.field.replace("_", "-")) from None
    return options


def _offload_config(args: argparse.Namespace) -> Any:
    if args.offload_budget is None:
        return None
    try:
        from moekit.inference.offload import OffloadConfig
    except ImportError as exc:
        raise MoekitError(
            f"--offload-budget: expert offloading is not available in this install ({exc})"
        ) from None
    try:
        return OffloadConfig(budget_bytes=args.offload_budget, policy=args.offload_policy, source=args.source)
    except MoekitError as exc:
        raise MoekitError(f"--offload-budget {args.offload_budget!r}: {exc}") from None


def _hf_eos(directory: Path) -> Any:
    from moekit.io import read_json

    config = read_json(directory / "config.json", "HF config")
    return config.get("eos_token_id") if isinstance(config, dict) else None


def load_for_generation(source: Path, experts_on_disk: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, eos ids) of a moekit checkpoint or an HF folder, tokenizer checked first;
    `experts_on_disk`: an HF folder's routed experts stay unread (offloading streams them)."""
    from moekit.analysis.cli import LoadedModel, is_hf_directory

    if not source.exists():
        raise MoekitError(f"{source}: no such file or directory")
    if is_hf_directory(source):
        if not (source / "tokenizer.json").is_file():
            raise MoekitError(f"{source}: no tokenizer.json; generating text needs the model's tokenizer")
        eos = _hf_eos(source)
    loaded = LoadedModel(source, experts_on_disk)
    if not is_hf_directory(source):
        eos = loaded.tokenizer.eos_id
        from moekit.compress.storage import is_packed_directory, packed_eos

        if is_packed_directory(source) and packed_eos(source) is not None:  # a packed HF family
            eos = packed_eos(source)
    from moekit.addressing import require_moe_layers

    require_moe_layers(loaded.model, "moekit generate")
    return loaded.model, loaded.tokenizer, eos


def routing_of_generated(
    capture: Any, layers: list[tuple[int, str, Any]], steps: int
) -> list[dict[str, Any]]:
    """Per MoE layer, the experts (best first) and weights of the position that produced each
    generated token."""
    out = []
    for index, name, _ in layers:
        experts, weights = [], []
        for routing in capture.routings.get(index, [])[:steps]:
            last = routing.num_tokens - 1
            kept = routing.kept
            chosen = kept.token == last
            order = kept.rank[chosen].argsort()
            experts.append(kept.expert[chosen][order].tolist())
            weights.append([round(float(w), 6) for w in kept.weight[chosen][order]])
        out.append({"layer": index, "name": name, "experts": experts, "weights": weights})
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from moekit.addressing import moe_layers
    from moekit.data.tokenizer import encode_prompt
    from moekit.device import autocast, resolve_device, resolve_dtype, warn_if_slow_bf16
    from moekit.inference.generate import stream
    from moekit.io import write_json_atomic
    from moekit.routing.override import Overrides, RoutingCapture

    options = _generation_options(args)
    offload = _offload_config(args)
    device, dtype = resolve_device(args.device, "--device"), resolve_dtype(args.dtype, "--dtype")
    if offload is not None and device.type != "cpu":
        raise MoekitError("--offload-budget: experts stream from disk into CPU memory; use --device cpu")
    warn_if_slow_bf16(dtype, device)
    if args.json is not None and not args.json.parent.is_dir():
        raise MoekitError(f"--json: the folder {args.json.parent} does not exist")
    if not args.prompt:
        raise MoekitError("--prompt: empty; expected some text to continue")
    from moekit.inference.methods.cli import odp_from_arguments

    odp = odp_from_arguments(args)
    if odp is not None and args.premoe:
        raise MoekitError("--premoe: not with the --odp-* options (one routing override at a time)")
    model, tokenizer, eos = load_for_generation(args.source, experts_on_disk=offload is not None)
    prompt_ids = encode_prompt(tokenizer, args.prompt)
    if not prompt_ids:
        raise MoekitError("--prompt: the tokenizer turns it into no tokens; expected at least one")
    context = model.context_length
    if len(prompt_ids) + args.max_new_tokens > context:
        raise MoekitError(
            f"--prompt: {len(prompt_ids)} tokens plus --max-new-tokens {args.max_new_tokens} exceed the "
            f"model's context of {context} positions"
        )
    capture = RoutingCapture()
    overrides = Overrides(capture=capture)
    if odp is not None:
        overrides = Overrides(odp.layers, odp.default, capture)
    premoe = None
    if args.premoe:
        from moekit.compress.premoe import load_masks

        if offload is not None:
            raise MoekitError(
                "--premoe: not with --offload-budget (the retrieval pass needs the experts in memory)"
            )

        masks = load_masks(args.source)
        domain, distances = masks.retrieve(model, torch.tensor(prompt_ids))
        overrides = masks.overrides(domain, capture)
        distance = dict(zip(masks.domains, distances.tolist(), strict=True))
        premoe = {"domain": masks.domains[domain], "distances": distance}
        if not args.quiet:
            print(f"premoe: the prompt's domain is {masks.domains[domain]!r}", file=sys.stderr)
    report: dict[str, Any] = {}
    if offload is None:  # offloaded experts are meta tensors until streamed: the model stays on the CPU
        model.to(device)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generated: list[int] = []
    printed = ""
    first_time = None
    start = time.perf_counter()
    try:
        # bf16: the products in bf16, the routers in fp32, a CPU step's experts from fp32 weights
        with autocast(device, dtype):
            for token in stream(
                model,
                ids,
                overrides=overrides,
                offload=offload,
                report=report,
                eos_token_id=eos,
                **options,
            ):
                if first_time is None:
                    first_time = time.perf_counter()
                generated.append(int(token[0]))
                text = tokenizer.decode(generated)
                if not args.quiet and text.startswith(printed):
                    sys.stdout.write(text[len(printed) :])
                    sys.stdout.flush()
                    printed = text
    except ConfigError as exc:  # an ODP option the model's layers cannot take (found at the first step)
        if exc.field != "override.skipped_top_k":
            raise
        raise exc.renamed("--odp-skipped-top-k") from None
    end = time.perf_counter()
    if not args.quiet:
        sys.stdout.write("\n")
    decode_steps = len(generated) - 1
    decode_seconds = end - first_time if first_time is not None else 0.0
    result: dict[str, Any] = {
        "source": str(args.source),
        "prompt": args.prompt,
        "prompt_ids": prompt_ids,
        "output_ids": prompt_ids + generated,
        "text": tokenizer.decode(generated),
        "new_tokens": len(generated),
        "seconds": end - start,
        "prefill_seconds": (first_time - start) if first_time is not None else 0.0,
        "tokens_per_second": decode_steps / decode_seconds
        if decode_steps > 0 and decode_seconds > 0
        else None,
        "options": options,
        "device": str(device),
        "dtype": args.dtype,
        "routing": routing_of_generated(capture, moe_layers(model), len(generated)),
    }
    if "offload" in report:
        result["offload"] = report["offload"]
    if premoe is not None:
        result["premoe"] = premoe
    if odp is not None:
        result["odp"] = {
            "threshold": args.odp_threshold or 0.0,
            "skip_fraction": args.odp_skip_fraction,
            "protect_fraction": args.odp_protect_fraction,
            "skipped_top_k": args.odp_skipped_top_k,
            "importance": args.odp_importance,
            "spare_last_token": not args.odp_skip_last_token,
        }
    if args.json is not None:
        write_json_atomic(args.json, result)
    return 0
