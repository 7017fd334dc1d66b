"""`moekit eval-tasks SRC --method none|scmoe|rewire|steer|odp|des|c3po|premoe --limit N --json OUT`:
a test-time routing method's accuracy on the built-in exact-answer math tasks (a difficulty
`--level`, the `--cipher` language), with a 95% interval and its cost (forward and backward
passes, routed assignments, tokens/s). `premoe` applies, per problem, the PreMoe mask of the domain
retrieved from its prompt (the masks `moekit compress` stored with SRC)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, MoekitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.inference.methods.c3po import KERNELS, NEIGHBOUR_MODES, VARIANTS
    from moekit.inference.methods.tasks import LEVELS, METHODS, TASK_SETS

    parser.add_argument("source", type=Path, metavar="SRC", help="moekit checkpoint or run dir, or HF folder")
    parser.add_argument("--method", default="none", choices=METHODS, help="the test-time method")
    parser.add_argument("--set", dest="task_set", default="arithmetic", choices=list(TASK_SETS))
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="number of problems")
    parser.add_argument("--max-new-tokens", type=int, default=12, metavar="N")
    parser.add_argument("--beta", type=float, default=0.5, help="SCMoE contrast strength")
    parser.add_argument("--alpha", type=float, default=0.1, help="SCMoE plausibility threshold")
    parser.add_argument("--weak-top-k", type=int, default=1, help="SCMoE weak pass: experts per token")
    parser.add_argument(
        "--weak-rank", type=int, default=None, help="SCMoE weak pass: only each token's expert of this rank"
    )
    parser.add_argument("--rewire-steps", type=int, default=5)
    parser.add_argument("--rewire-lr", type=float, default=0.1)
    parser.add_argument("--steer-strength", type=float, default=1.0)
    add_odp_arguments(parser, threshold=0.5)
    parser.add_argument("--samples", type=int, default=8, metavar="N", help="DES: trajectories per problem")
    parser.add_argument(
        "--k-values",
        default=None,
        metavar="K,K,...",
        help="DES: the k-set (one value = best-of-N at fixed k; default: the model's k and its neighbours)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="DES: sampling temperature")
    parser.add_argument(
        "--level", type=int, default=None, choices=LEVELS, help="difficulty: digits of the longest number"
    )
    parser.add_argument("--cipher", action="store_true", help="the problems in the cipher language (#50)")
    parser.add_argument(
        "--steer-layers",
        default=None,
        metavar="L,L,...",
        help="steer: MoE-layer indices (default: the middle one)",
    )
    parser.add_argument("--steer-top-n", type=int, default=1, help="steer: experts boosted per layer")
    parser.add_argument(
        "--c3po-variant", default="ngd", choices=VARIANTS, help="C3PO: NGD or kernel regression"
    )
    parser.add_argument(
        "--c3po-references", type=int, default=64, metavar="N", help="C3PO: reference problems"
    )
    parser.add_argument(
        "--c3po-reference-set", default=None, choices=list(TASK_SETS), help="C3PO: their set (default: --set)"
    )
    parser.add_argument(
        "--c3po-unsolved", action="store_true", help="C3PO: keep references the model does not solve"
    )
    parser.add_argument("--c3po-neighbours", type=int, default=3, metavar="K")
    parser.add_argument("--c3po-neighbour-mode", default="nearest", choices=NEIGHBOUR_MODES)
    parser.add_argument("--c3po-kernel", default="gaussian", choices=KERNELS)
    parser.add_argument("--c3po-steps", type=int, default=10, help="C3PO NGD: optimisation steps")
    parser.add_argument("--c3po-lr", type=float, default=0.1, help="C3PO NGD: Adam learning rate")
    parser.add_argument("--c3po-layers", type=int, default=None, help="C3PO: critical (last) MoE layers")
    parser.add_argument(
        "--c3po-core-experts", type=int, default=None, help="C3PO NGD: free experts per layer"
    )
    parser.add_argument(
        "--c3po-apply-to-new",
        action="store_true",
        help="C3PO: route every generated token by the re-mixed pathway too, as the released code "
        "does (default: the last prompt token only, which predicts just the first new token)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result as JSON")


def add_odp_arguments(parser: argparse.ArgumentParser, threshold: float | None) -> None:
    """Online dynamic pruning's options (MC-MoE #38; `moekit.inference.methods.odp`), shared by
    `eval-tasks --method odp` and `generate`; `threshold`: the default of --odp-threshold."""
    from moekit.routing.importance import IMPORTANCE_KINDS

    group = parser.add_argument_group("online dynamic pruning (MC-MoE #38)")
    group.add_argument(
        "--odp-threshold",
        type=float,
        default=threshold,
        metavar="BETA",
        help="skip a token's second expert where its weight is below BETA x the first's (0: never)",
    )
    group.add_argument(
        "--odp-skip-fraction",
        type=float,
        default=0.0,
        metavar="TAU_L",
        help="the least important fraction of each prompt's tokens skip their routed experts (paper: 0.1)",
    )
    group.add_argument(
        "--odp-protect-fraction",
        type=float,
        default=0.0,
        metavar="TAU_H",
        help="the most important fraction of each prompt's tokens keep all their experts (paper: 0.1)",
    )
    group.add_argument(
        "--odp-skipped-top-k",
        type=int,
        default=0,
        metavar="K",
        help="experts a skipped token keeps, its best first (0: none, as the paper)",
    )
    group.add_argument(
        "--odp-importance",
        default="attention",
        choices=IMPORTANCE_KINDS,
        help="token importance: the attention each token receives x its L1 norm (the paper), or "
        "its L1 norm over the positions attending to it (the released code; needs no attention)",
    )
    group.add_argument(
        "--odp-skip-last-token",
        action="store_true",
        help="let the last prompt token skip its experts too (the paper's rule as written; by "
        "default it never does, since its output is the first new token's distribution)",
    )


def odp_from_arguments(args: argparse.Namespace) -> Any:
    """The ODP `Overrides` the options ask for, or None when every rule is off (no --odp-threshold
    and no fraction); a bad value is one line naming its option."""
    from moekit.inference.methods.odp import odp_overrides

    if args.odp_threshold is None and not (args.odp_skip_fraction or args.odp_protect_fraction):
        return None
    try:
        return odp_overrides(
            args.odp_threshold or 0.0,
            skip_fraction=args.odp_skip_fraction,
            protect_fraction=args.odp_protect_fraction,
            skipped_top_k=args.odp_skipped_top_k,
            importance=args.odp_importance,
            spare_last_token=not args.odp_skip_last_token,
        )
    except ConfigError as exc:
        raise exc.renamed("--odp-" + exc.field.replace("_", "-")) from None


def main(args: argparse.Namespace) -> int:
    from moekit.data.tokenizer import encode_prompt
    from moekit.inference.cli import load_for_generation
    from moekit.inference.methods.tasks import MethodSettings, evaluate_method, task_problems
    from moekit.io import write_json_atomic

    if args.limit < 1:
        raise MoekitError(f"--limit: got {args.limit}, expected a positive number of problems")
    if args.max_new_tokens < 1:
        raise MoekitError(f"--max-new-tokens: got {args.max_new_tokens}, expected at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        raise MoekitError(f"--json: the folder {args.json.parent} does not exist")
    k_values = None
    if args.k_values is not None:
        try:
            k_values = [int(part) for part in args.k_values.split(",")]
        except ValueError:
            raise MoekitError(
                f"--k-values: got {args.k_values!r}, expected comma-separated integers like 1,2,3"
            ) from None
    steer_layers = None
    if args.steer_layers is not None:
        try:
            steer_layers = [int(part) for part in args.steer_layers.split(",")]
        except ValueError:
            raise MoekitError(
                f"--steer-layers: got {args.steer_layers!r}, expected comma-separated MoE-layer indices"
            ) from None
    if args.c3po_references < 1:
        raise MoekitError(f"--c3po-references: got {args.c3po_references}, expected a positive number")
    if args.samples < 1:
        raise MoekitError(f"--samples: got {args.samples}, expected a positive number of trajectories")
    settings = MethodSettings(
        beta=args.beta,
        alpha=args.alpha,
        weak_top_k=args.weak_top_k,
        weak_ranks=None if args.weak_rank is None else [args.weak_rank],
        rewire_steps=args.rewire_steps,
        rewire_lr=args.rewire_lr,
        steer_strength=args.steer_strength,
        odp_threshold=args.odp_threshold,
        odp_skip_fraction=args.odp_skip_fraction,
        odp_protect_fraction=args.odp_protect_fraction,
        odp_skipped_top_k=args.odp_skipped_top_k,
        odp_importance=args.odp_importance,
        odp_spare_last_token=not args.odp_skip_last_token,
        des_samples=args.samples,
        des_k_values=k_values,
        des_temperature=args.temperature,
        steer_layers=steer_layers,
        steer_top_n=args.steer_top_n,
        steer_reference_set=args.task_set,
        steer_reference_level=args.level,
        c3po_variant=args.c3po_variant,
        c3po_references=args.c3po_references,
        c3po_reference_set=args.c3po_reference_set or args.task_set,
        c3po_reference_level=args.level,
        c3po_reference_ciphered=args.cipher,
        c3po_solved_only=not args.c3po_unsolved,
        c3po_neighbours=args.c3po_neighbours,
        c3po_neighbour_mode=args.c3po_neighbour_mode,
        c3po_kernel=args.c3po_kernel,
        c3po_steps=args.c3po_steps,
        c3po_lr=args.c3po_lr,
        c3po_layers=args.c3po_layers,
        c3po_core_experts=args.c3po_core_experts,
        c3po_apply_to_new=args.c3po_apply_to_new,
    )
    if args.method == "odp":
        odp_from_arguments(args)  # checks the options before the model loads
    model, tokenizer, eos = load_for_generation(args.source)
    if args.method == "premoe":
        from moekit.compress.premoe import load_masks

        settings.premoe_masks = load_masks(args.source)
    try:
        problems = task_problems(args.task_set, args.limit, level=args.level, ciphered=args.cipher)
    except ConfigError as exc:
        raise MoekitError(f"--{exc}") from None
    longest = max(len(encode_prompt(tokenizer, p.prompt)) for p in problems) + args.max_new_tokens
    if longest > model.context_length:
        raise MoekitError(
            f"--max-new-tokens: the longest prompt plus {args.max_new_tokens} new tokens needs {longest} "
            f"positions, more than the model's context of {model.context_length}"
        )
    try:
        result = evaluate_method(
            model, tokenizer, problems, args.method, settings, args.max_new_tokens, eos_token_id=eos
        )
    except ConfigError as exc:
        raise exc.renamed("--" + _flag(exc.field, args.method)) from None
    result = {
        "source": str(args.source),
        "set": args.task_set,
        "level": args.level,
        "ciphered": args.cipher,
        **result,
    }
    low, high = result["ci95"]
    print(
        f"{args.method}: {result['correct']}/{result['problems']} correct, accuracy {result['accuracy']:.3f} "
        f"(95% CI {low:.3f}-{high:.3f}); {result['cost']['forward_passes']} forward, "
        f"{result['cost']['backward_passes']} backward passes"
    )
    if args.json is not None:
        write_json_atomic(args.json, result)
    return 0


def _flag(field: str, method: str) -> str:
    """The option a method's parameter error is about."""
    if field == "override.ranks":
        return "weak-rank"
    if field == "override.skipped_top_k":
        return "odp-skipped-top-k"
    if field == "override.top_k":
        return "weak-top-k" if method == "scmoe" else "top-k"
    if method == "rewire" and field in ("steps", "lr"):
        return f"rewire-{field}"
    if method == "steer" and field in ("layers", "top_n"):
        return f"steer-{field.replace('_', '-')}"
    if method == "odp":
        return f"odp-{field.replace('_', '-')}"
    if method == "c3po" and not field.startswith("c3po"):
        return f"c3po-{field.replace('_', '-')}"
    return field.replace("_", "-")
