"""The `moekit` command. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import argparse
import sys

from moekit.errors import MoekitError
from moekit.runtime import keep_freed_memory, tune_cpu_runtime


def _bench_layer(args: argparse.Namespace) -> int:
    from moekit.bench import layer

    return layer.main(args)


def _train(args: argparse.Namespace) -> int:
    from moekit.train.cli import train_main

    return train_main(args)


def _eval(args: argparse.Namespace) -> int:
    from moekit.train.cli import eval_main

    return eval_main(args)


def _data(args: argparse.Namespace) -> int:
    from moekit.data.cli import main

    return main(args)


def _analyze(args: argparse.Namespace) -> int:
    from moekit.analysis import cli as analysis_cli

    return analysis_cli.main(args)


def _demo(args: argparse.Namespace) -> int:
    from moekit import demo

    return demo.main(args)


def _convert(args: argparse.Namespace) -> int:
    from moekit.interop import cli as interop_cli

    return interop_cli.main(args)


def _bench_hf(args: argparse.Namespace) -> int:
    from moekit.bench import hf

    return hf.main(args)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like moekit's other errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _generate(args: argparse.Namespace) -> int:
    from moekit.inference import cli as inference_cli

    return inference_cli.main(args)


def _upcycle(args: argparse.Namespace) -> int:
    from moekit.construct import cli as construct_cli

    return construct_cli.main(args)


def _compress(args: argparse.Namespace) -> int:
    from moekit.compress import cli as compress_cli

    return compress_cli.main(args)


def _experiment(args: argparse.Namespace) -> int:
    from moekit.experiments import runner

    return runner.main(args)


def _eval_tasks(args: argparse.Namespace) -> int:
    from moekit.inference.methods import cli as methods_cli

    return methods_cli.main(args)


def _merge(args: argparse.Namespace) -> int:
    from moekit.merging import cli as merging_cli

    return merging_cli.main(args)


def _branch(args: argparse.Namespace) -> int:
    from moekit.domains import cli as domains_cli

    return domains_cli.branch_main(args)


def _mix(args: argparse.Namespace) -> int:
    from moekit.domains import cli as domains_cli

    return domains_cli.mix_main(args)


def _build(args: argparse.Namespace) -> int:
    from moekit.domains import cli as domains_cli

    return domains_cli.build_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moekit",
        description="moekit: Mixture-of-Experts layers, training, analysis and interop on PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from moekit.train.cli import add_eval_arguments, add_train_arguments

    train = sub.add_parser("train", help="train a dense or MoE language model from a YAML config")
    add_train_arguments(train)
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser("eval", help="per-domain loss of a checkpoint")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)
    from moekit.data.cli import add_arguments as add_data_arguments

    data = sub.add_parser("data", help="the built-in multi-domain corpus")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    build = data_sub.add_parser("build", help="build (or refresh) the corpus and print its manifest")
    add_data_arguments(build)
    build.set_defaults(handler=_data)
    data.set_defaults(handler=lambda args: (data.print_help(), 0)[1])

    from moekit.analysis.cli import add_arguments as add_analyze_arguments

    analyze = sub.add_parser(
        "analyze", help="routing-health report (report.html, metrics.json) of a checkpoint"
    )
    add_analyze_arguments(analyze)
    analyze.set_defaults(handler=_analyze)

    from moekit.interop.cli import add_arguments as add_convert_arguments

    convert = sub.add_parser("convert", help="Hugging Face checkpoints to moekit and back")
    add_convert_arguments(convert)
    convert.set_defaults(handler=_convert)

    from moekit.demo import add_arguments as add_demo_arguments

    demo = sub.add_parser("demo", help="train a dense model and an MoE on the built-in corpus and report")
    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo)

    from moekit.experiments.runner import add_arguments as add_experiment_arguments

    experiment = sub.add_parser(
        "experiment", help="reproduce a seed paper's claim in miniature: results.json with a verdict"
    )
    add_experiment_arguments(experiment)
    experiment.set_defaults(handler=_experiment)

    bench = sub.add_parser("bench", help="speed benchmarks (results feed BENCHMARKS.md)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    layer = bench_sub.add_parser(
        "layer", help="the MoE layer vs the dense-equivalent GEMM chain, HF transformers and DeepSpeed"
    )
    from moekit.bench.layer import add_arguments

    add_arguments(layer)
    layer.set_defaults(handler=_bench_layer)
    from moekit.bench.hf import add_arguments as add_bench_hf_arguments

    hf = bench_sub.add_parser(
        "hf", help="training step of tiny HF MoE models: stock eager/grouped_mm vs moekit.patch"
    )
    add_bench_hf_arguments(hf)
    hf.set_defaults(handler=_bench_hf)
    bench.set_defaults(handler=lambda args: (bench.print_help(), 0)[1])

    from moekit.inference.cli import add_arguments as add_generate_arguments

    generate = sub.add_parser("generate", help="generate text with a moekit or HF MoE checkpoint")
    add_generate_arguments(generate)
    generate.set_defaults(handler=_generate)

    from moekit.construct.cli import add_arguments as add_upcycle_arguments

    upcycle = sub.add_parser(
        "upcycle",
        help="a dense HF model or moekit run -> an MoE (copy, Drop-Upcycling, split), with a receipt",
    )
    add_upcycle_arguments(upcycle)
    upcycle.set_defaults(handler=_upcycle)

    from moekit.compress.cli import add_arguments as add_compress_arguments

    compress = sub.add_parser("compress", help="prune, merge or quantize an MoE's experts from a recipe")
    add_compress_arguments(compress)
    compress.set_defaults(handler=_compress)

    from moekit.inference.methods.cli import add_arguments as add_eval_tasks_arguments

    eval_tasks = sub.add_parser("eval-tasks", help="test-time routing methods on exact-answer math tasks")
    add_eval_tasks_arguments(eval_tasks)
    eval_tasks.set_defaults(handler=_eval_tasks)

    from moekit.merging.cli import add_arguments as add_merge_arguments

    merge = sub.add_parser(
        "merge", help="merge fine-tuned copies of one model: task arithmetic, TIES, DARE, PCB"
    )
    add_merge_arguments(merge)
    merge.set_defaults(handler=_merge)

    from moekit.domains import cli as domains_cli

    branch = sub.add_parser("branch", help="copy a dense seed once per domain and train each copy on it")
    domains_cli.add_branch_arguments(branch)
    branch.set_defaults(handler=_branch)
    mix = sub.add_parser(
        "mix", help="domain branches -> one MoE (BTX, FlexOlmo router); opt a domain's expert out or in"
    )
    domains_cli.add_mix_arguments(mix)
    mix.set_defaults(handler=_mix)
    build_cmd = sub.add_parser(
        "build", help="branch, mix, ensemble and merge domain experts from a recipe; per-domain losses"
    )
    domains_cli.add_build_arguments(build_cmd)
    build_cmd.set_defaults(handler=_build)
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
