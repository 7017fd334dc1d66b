"""The `moekit` command. Each subcommand lives in its own module (its `add_arguments` and its
handler), imported when the parser is built rather than when this module is."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from moekit.errors import MoekitError
from moekit.runtime import keep_freed_memory, tune_cpu_runtime


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like moekit's other errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _missing_action(parser: argparse.ArgumentParser, actions) -> Callable[[argparse.Namespace], int]:
    """The handler of a command run without its sub-command (`moekit bench`): a usage error naming
    the choices, exit status 2 (not the help and status 0, which a script would take for success)."""

    def handler(args: argparse.Namespace) -> int:
        parser.error(f"missing {actions.metavar} (one of: {', '.join(actions.choices)})")
        return 2  # not reached: error() exits

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moekit",
        description="moekit: Mixture-of-Experts layers, training, analysis and interop on PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from moekit.train import cli as train_cli

    train = sub.add_parser("train", help="train a dense or MoE language model from a YAML config")
    train_cli.add_train_arguments(train)
    train.set_defaults(handler=train_cli.train_main)
    evaluate = sub.add_parser("eval", help="per-domain loss of a checkpoint")
    train_cli.add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=train_cli.eval_main)
    from moekit.data import cli as data_cli

    data = sub.add_parser("data", help="the built-in multi-domain corpus")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    build = data_sub.add_parser("build", help="build (or refresh) the corpus and print its manifest")
    data_cli.add_arguments(build)
    build.set_defaults(handler=data_cli.main)
    data.set_defaults(handler=_missing_action(data, data_sub))

    from moekit.analysis import cli as analysis_cli

    analyze = sub.add_parser(
        "analyze", help="routing-health report (report.html, metrics.json) of a checkpoint"
    )
    analysis_cli.add_arguments(analyze)
    analyze.set_defaults(handler=analysis_cli.main)

    from moekit.interop import cli as interop_cli

    convert = sub.add_parser("convert", help="Hugging Face checkpoints to moekit and back")
    interop_cli.add_arguments(convert)
    convert.set_defaults(handler=interop_cli.main)

    from moekit import demo as demo_cli

    demo = sub.add_parser("demo", help="train a dense model and an MoE on the built-in corpus and report")
    demo_cli.add_arguments(demo)
    demo.set_defaults(handler=demo_cli.main)

    from moekit.experiments import runner as experiment_cli

    experiment = sub.add_parser(
        "experiment", help="reproduce a seed paper's claim in miniature: results.json with a verdict"
    )
    experiment_cli.add_arguments(experiment)
    experiment.set_defaults(handler=experiment_cli.main)

    bench = sub.add_parser("bench", help="speed benchmarks (results feed BENCHMARKS.md)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    layer = bench_sub.add_parser(
        "layer", help="the MoE layer vs the dense-equivalent GEMM chain, HF transformers and DeepSpeed"
    )
    from moekit.bench import layer as bench_layer_cli

    bench_layer_cli.add_arguments(layer)
    layer.set_defaults(handler=bench_layer_cli.main)
    from moekit.bench import hf as bench_hf_cli

    hf = bench_sub.add_parser(
        "hf", help="training step of tiny HF MoE models: stock eager/grouped_mm vs moekit.patch"
    )
    bench_hf_cli.add_arguments(hf)
    hf.set_defaults(handler=bench_hf_cli.main)
    bench.set_defaults(handler=_missing_action(bench, bench_sub))

    from moekit.inference import cli as inference_cli

    generate = sub.add_parser("generate", help="generate text with a moekit or HF MoE checkpoint")
    inference_cli.add_arguments(generate)
    generate.set_defaults(handler=inference_cli.main)

    from moekit.construct import cli as construct_cli

    upcycle = sub.add_parser(
        "upcycle",
        help="a dense HF model or moekit run -> an MoE (copy, Drop-Upcycling, split), with a receipt",
    )
    construct_cli.add_arguments(upcycle)
    upcycle.set_defaults(handler=construct_cli.main)

    from moekit.compress import cli as compress_cli

    compress = sub.add_parser("compress", help="prune, merge or quantize an MoE's experts from a recipe")
    compress_cli.add_arguments(compress)
    compress.set_defaults(handler=compress_cli.main)

    from moekit.inference.methods import cli as methods_cli

    eval_tasks = sub.add_parser("eval-tasks", help="test-time routing methods on exact-answer math tasks")
    methods_cli.add_arguments(eval_tasks)
    eval_tasks.set_defaults(handler=methods_cli.main)

    from moekit.merging import cli as merging_cli

    merge = sub.add_parser(
        "merge", help="merge fine-tuned copies of one model: task arithmetic, TIES, DARE, PCB"
    )
    merging_cli.add_arguments(merge)
    merge.set_defaults(handler=merging_cli.main)

    from moekit.domains import cli as domains_cli

    branch = sub.add_parser("branch", help="copy a dense seed once per domain and train each copy on it")
    domains_cli.add_branch_arguments(branch)
    branch.set_defaults(handler=domains_cli.branch_main)
    mix = sub.add_parser(
        "mix", help="domain branches -> one MoE (BTX, FlexOlmo router); opt a domain's expert out or in"
    )
    domains_cli.add_mix_arguments(mix)
    mix.set_defaults(handler=domains_cli.mix_main)
    build_cmd = sub.add_parser(
        "build", help="branch, mix, ensemble and merge domain experts from a recipe; per-domain losses"
    )
    domains_cli.add_build_arguments(build_cmd)
    build_cmd.set_defaults(handler=domains_cli.build_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    tune_cpu_runtime()
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        from moekit.preflight import check_command

        check_command(args)
        return int(handler(args) or 0)
    except MoekitError as exc:
        print(f"moekit: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """The message with control characters (newlines from a user's input) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


if __name__ == "__main__":
    sys.exit(main())
