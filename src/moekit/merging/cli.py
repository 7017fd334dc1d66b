"""`moekit merge --method ta|ties|dare|pcb BASE MODEL [MODEL ...] --out DST [parameters]`."""

from __future__ import annotations

import argparse

# the CLI's --method -> merge_state_dicts' method (DARE combines with TA or TIES: --dare-with)
CLI_METHODS = ("ta", "ties", "dare", "pcb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the common base: an HF model folder or a moekit run")
    parser.add_argument("models", metavar="MODEL", nargs="+", help="fine-tuned copies of BASE (same kind)")
    parser.add_argument("--out", required=True, metavar="DST", help="folder to write (must not exist)")
    parser.add_argument(
        "--method", required=True, choices=CLI_METHODS, help="task arithmetic, TIES, DARE, PCB"
    )
    parser.add_argument(
        "--dare-with", choices=("ta", "ties"), default=None,
        help="dare: merge the dropped task vectors by task arithmetic or TIES (default ties)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", type=float, nargs="+", metavar="W", help="one weight per MODEL (default 1)"
    )
    parser.add_argument("--lam", type=float, help="lambda, scale of the merged task vector (default 1)")
    parser.add_argument("--density", type=float, help="ties: fraction kept per tensor / expert (default 0.2)")
    parser.add_argument("--drop-rate", type=float, help="dare: drop probability p (default 0.9)")
    parser.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    parser.add_argument("--ratio", type=float, help="pcb: fraction kept per tensor / expert (default 0.1)")


def main(args: argparse.Namespace) -> int:
    from moekit.errors import MoekitError
    from moekit.merging.checkpoints import merge_checkpoints

    if args.dare_with is not None and args.method != "dare":
        raise MoekitError("--dare-with: only applies to --method dare")
    method = f"dare_{args.dare_with or 'ties'}" if args.method == "dare" else args.method
    given = {
        "weights": args.weights,
        "lam": args.lam,
        "density": args.density,
        "drop_rate": args.drop_rate,
        "seed": args.seed,
        "ratio": args.ratio,
    }
    params = {k: v for k, v in given.items() if v is not None}
    try:
        record = merge_checkpoints(args.base, args.models, args.out, method, **params)
    except MoekitError as exc:  # name the CLI flag rather than the Python parameter
        message = str(exc)
        for key in given:
            flag = "--" + key.replace("_", "-")
            if message.startswith(f"{key}:") or message.startswith(f"{key}["):
                message = flag + message[len(key) :]
        raise MoekitError(message) from None
    shown = ", ".join(f"{k}={v}" for k, v in record["params"].items() if v is not None)
    print(
        f"{args.base} + {len(args.models)} model(s) -> {args.out}: {method} ({shown}), "
        f"{record['tensors']} tensors, {record['fused_expert_tensors']} fused expert tensors split per expert"
    )
    return 0
