"""`moekit branch`, `moekit mix` and `moekit build`.

moekit branch SEED OUT --domains code,english,math [--steps 100] [--parts ffn|flexolmo]
moekit mix BRANCHES OUT [--router random|hidden|flexolmo] [--top-k 2] [--public]
           [--attention average|experts|shared_kv] [--attention-top-k 0] [--parallel]   # BAM
moekit mix MIXED OUT --remove DOMAIN              # opt-out: drop one domain's expert
moekit mix MIXED OUT --add BRANCH_RUN --domain D  # opt-in: add one
moekit build RECIPE.yaml [--out DIR]
"""

from __future__ import annotations

import argparse


def add_branch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "seed", metavar="SEED", help="a dense moekit run/checkpoint or HF dense (Llama, Qwen2, Qwen3) folder"
    )
    parser.add_argument(
        "out", metavar="OUT", help="folder of the branches (one run per domain, branches.json)"
    )
    parser.add_argument("--domains", required=True, help="comma-separated corpus domains, one branch each")
    parser.add_argument("--source", default="sample", help="corpus: sample, builtin or a corpus folder")
    parser.add_argument("--tokenizer", default="byte", choices=("byte", "bpe"))
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="training steps per branch")
    parser.add_argument(
        "--parts",
        default="all",
        choices=("all", "ffn", "flexolmo"),
        help="train everything, only the FFNs, or FlexOlmo's coordinated 2-expert owner models",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="--parts flexolmo: the owner router's k, 1 or 2 (default 2)"
    )
    parser.add_argument(
        "--bias",
        type=float,
        default=None,
        help="--parts flexolmo: initial negative bias b, learned (default -0.5)",
    )
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)


def add_mix_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.domains.mix import ATTENTION, ROUTERS

    parser.add_argument(
        "src", metavar="SRC", help="a branches folder (or, with --remove/--add, a mixed model)"
    )
    parser.add_argument("out", metavar="OUT", help="folder to write (a moekit checkpoint run)")
    parser.add_argument("--router", default="random", choices=ROUTERS)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--public", action="store_true", help="the seed's FFN as expert 0 (implied by flexolmo)"
    )
    parser.add_argument("--bias", type=float, default=None, help="FlexOlmo's negative bias b (default -0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random router")
    parser.add_argument(
        "--attention",
        default="average",
        choices=ATTENTION,
        help="BAM: each branch's attention as an attention expert (experts), or its Q/O over "
        "averaged K/V (shared_kv); default: averaged attention (BTX)",
    )
    parser.add_argument(
        "--attention-top-k", type=int, default=0, help="attention experts per token; 0 = soft routing (BAM)"
    )
    parser.add_argument(
        "--parallel", action="store_true", help="BAM's parallel block: x + Attn(norm(x)) + FFN(norm(x))"
    )
    parser.add_argument("--remove", metavar="DOMAIN", help="opt-out: remove this domain's expert from SRC")
    parser.add_argument("--add", metavar="RUN", help="opt-in: add the FFNs of this dense branch run to SRC")
    parser.add_argument("--domain", help="the domain of the expert added with --add")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="the YAML recipe (see configs/domains/)")
    parser.add_argument("--out", help="output folder (default: the recipe's out_dir)")


# The options of `moekit branch` and `moekit mix` under the names of the inputs they set, so that
# an error names the option the user typed (`--steps`), not an internal field (`train.steps`).
BRANCH_FLAGS = {
    "seed": "SEED",
    "out": "OUT",
    "domains": "--domains",
    "source": "--source",
    "tokenizer": "--tokenizer",
    "seq_len": "--seq-len",
    "steps": "--steps",
    "parts": "--parts",
    "top_k": "--top-k",
    "bias": "--bias",
    "train": "train",
}
TRAIN_FLAGS = {"train.lr": "--lr", "train.micro_batch_size": "--micro-batch-size"}


def _flag(exc, flags: dict[str, str]):
    """`exc` (a ConfigError) under the option's name when its field is one of `flags`."""

    if exc.field not in flags:
        return exc
    return exc.renamed(flags[exc.field])


def _mix_flag(exc):
    """A MixOptions error (`mix.attention_top_k`) under its option (`--attention-top-k`)."""
    if not exc.field.startswith("mix."):
        return exc
    name = exc.field.split(".", 1)[1]
    return _flag(exc, {exc.field: "--" + name.replace("_", "-")})


def branch_main(args: argparse.Namespace) -> int:
    from moekit.domains.branch import branch
    from moekit.errors import ConfigError

    if args.parts != "flexolmo":
        for flag, value in (("--top-k", args.top_k), ("--bias", args.bias)):
            if value is not None:
                raise ConfigError(flag, f"only --parts flexolmo takes {flag} (got --parts {args.parts})")
    train = {}
    if args.lr is not None:
        train["lr"] = args.lr
    if args.micro_batch_size is not None:
        train["micro_batch_size"] = args.micro_batch_size
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    try:
        manifest = branch(args.seed, args.out, domains, source=args.source, tokenizer=args.tokenizer,
                          seq_len=args.seq_len, steps=args.steps, parts=args.parts, train=train,
                          top_k=2 if args.top_k is None else args.top_k,
                          bias=-0.5 if args.bias is None else args.bias,
                          fields=BRANCH_FLAGS)  # fmt: skip
    except ConfigError as exc:
        raise _flag(exc, TRAIN_FLAGS) from None
    for domain in manifest["domains"]:
        own = manifest["val_loss"][domain].get(domain)
        print(f"{domain}: validation loss on its own domain {own:.4f}")
    return 0


def mix_main(args: argparse.Namespace) -> int:
    from moekit.construct.receipt import summary
    from moekit.domains.experts import edit_experts
    from moekit.domains.mix import MixOptions, mix
    from moekit.errors import ConfigError

    if args.remove is not None or args.add is not None:
        edit_experts(args.src, args.out, remove=args.remove, add=args.add, domain=args.domain,
                     bias=args.bias, overwrite=args.overwrite)  # fmt: skip
        return 0
    if args.bias is not None and args.router != "flexolmo":
        raise ConfigError("--bias", f"only --router flexolmo takes a bias (got --router {args.router})")
    try:
        options = MixOptions(router=args.router, top_k=args.top_k, public=args.public, seed=args.seed,
                             attention=args.attention, attention_top_k=args.attention_top_k,
                             parallel=args.parallel,
                             **({"bias": args.bias} if args.bias is not None else {}))  # fmt: skip
        receipt = mix(args.src, args.out, options, overwrite=args.overwrite)
    except ConfigError as exc:
        raise _mix_flag(exc) from None
    print(summary(receipt))
    return 0


def build_main(args: argparse.Namespace) -> int:
    from moekit.domains.build import build

    results = build(args.recipe, out_dir=args.out)
    for key, claim in results["claims"].items():
        print(f"{key}: {claim['verdict']}")
    return 0
