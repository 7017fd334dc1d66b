"""Test-time routing methods measured on a small MoE trained for them (BENCHMARKS.md, "Test-time
routing").

    .venv/bin/python benchmarks/test_time_routing.py build --out runs/ttr    # corpus + config + train
    .venv/bin/python benchmarks/test_time_routing.py measure --run runs/ttr/run --level 1 --limit 200
    .venv/bin/python benchmarks/test_time_routing.py extras --run runs/ttr/run --out runs/ttr
    .venv/bin/python benchmarks/test_time_routing.py summary runs/ttr/results/*.json \
        --baseline runs/ttr/results/none.json

`build` is `corpus` (the corpus and `config.yaml`) followed by `moekit train --config
runs/ttr/config.yaml`; its options (`--steps`, `--layers`, `--width`, `--batch`, `--lr`, ...) set
the model and the run. The corpus is the task's own text and little else, so that a model trained
for under an hour on two shared cores answers part of the easiest level:
- `math`: arithmetic problems (add, sub, mul, div, remainder, expression) of the training seed,
  drawn level by level (`LEVEL_COUNTS`; level 1, every number a single digit, is repeated
  `LEVEL_REPEATS` times so that it is not a few percent of the bytes);
- `cipher`: the next problems of each level, a quarter as many, in the cipher language (#50's
  second language);
- `english`: the shipped sample's English prose (the domain seen least; Rewiring's target).
The evaluation problems come from another seed (`EVAL_SEED`); at level 1 there are few distinct
problems (about 700 sums, differences and products of two digits, plus bracketed expressions), so
many evaluation items also occur in training: level 1 measures recall as much as arithmetic.

`extras` measures what `moekit eval-tasks` does not: the per-layer routing divergence between the
plain and ciphered prompts (#50's U-shape) and Rewiring's continuation loss on held-out English.
The model is not stored: `build` rebuilds it (seeded; the same on a quiet or loaded machine up to
thread-count effects on float sums).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.data.build import build_from_recipe, load_sample
from moekit.data.corpus import Document
from moekit.data.mathgen import generate_problem
from moekit.data.recipes import MATH_SEED, DomainRecipe, Recipe
from moekit.data.sources.base import BuildContext, Collected, Provenance, document_id
from moekit.inference.methods.cipher import CipheredProblem
from moekit.inference.methods.tasks import TASK_SETS, problem_level
from moekit.io import write_json_atomic

# Problems per level in the `math` domain: level 1 (single digits) is rare in the generator's
# stream (about 1 arithmetic problem in 75), so it is drawn on its own rather than left to chance.
LEVEL_COUNTS = {1: 6_000, 2: 45_000}
LEVEL_REPEATS = {1: 4, 2: 1}  # level 1 is short and few-valued: repeated so it holds ~30% of math bytes
CIPHER_SHARE = 4  # the cipher domain holds a quarter as many problems per level

CONFIG = """# Test-time routing benchmark model (benchmarks/test_time_routing.py).
name: ttr
out_dir: {out}/run
model:
  vocab_size: auto
  hidden_size: {width}
  num_layers: {layers}
  num_heads: 4
  ff_size: {ff}
  max_seq_len: 128
  moe:
    ff_size: {expert_ff}
    router: {{preset: qwen3_moe, num_experts: 8, top_k: 2}}
data:
  source: {out}/corpus
  tokenizer: byte
  seq_len: 128
  layout: packed
train:
  steps: {steps}
  micro_batch_size: {batch}
  grad_accum: 1
  lr: {lr}
  min_lr_ratio: 0.05
  warmup_steps: 100
loop:
  log_every: 50
  eval_every: {checkpoint_every}
  eval_batches: 4
  checkpoint_every: {checkpoint_every}
balance:
  objectives:
    - {{kind: load_balance, scope: global, coefficient: 0.01}}
    - {{kind: z_loss, scope: global, coefficient: 0.001}}
"""


def arithmetic_of_level(level: int, start_index: int, count: int) -> tuple[list[Any], int]:
    """`count` training-seed arithmetic problems of `problem_level` `level` from stream index
    `start_index` on, as (index, problem), and the index after the last one taken."""
    kinds = set(TASK_SETS["arithmetic"])
    out, index = [], start_index
    while len(out) < count:
        problem = generate_problem(MATH_SEED, index)
        index += 1
        if problem.kind in kinds and problem_level(problem) == level:
            out.append((index - 1, problem))
    return out, index


@dataclass(frozen=True)
class LevelArithmetic:
    """Arithmetic problems of one level, plain or ciphered, as one corpus source; the documents
    are the task's own text ('Q: ...\\nA: <answer>'), so training and evaluation prompts agree."""

    level: int
    start: int
    count: int
    ciphered: bool = False
    repeats: int = 1
    name: str = "arithmetic"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        problems, _ = arithmetic_of_level(self.level, self.start, self.count)
        documents = []
        for index, problem in problems:
            item = CipheredProblem(problem) if self.ciphered else problem
            for copy in range(self.repeats):
                key = f"{problem.kind}-{index:08d}-{copy}"
                doc_id = document_id(domain, f"{self.name}-l{self.level}", key)
                documents.append(Document(doc_id, domain, item.text, answer=problem.answer))
        ordered = tuple(sorted(documents, key=lambda d: d.id))
        digest = hashlib.sha256("".join(d.text for d in ordered).encode()).hexdigest()
        provenance = Provenance(
            f"{self.name}-l{self.level}",
            f"seed={MATH_SEED}, level={self.level}, start={self.start}, count={self.count}, "
            f"ciphered={self.ciphered}, repeats={self.repeats}",
            "moekit.data.mathgen",
            "Apache-2.0 (generated by moekit)",
            digest,
        )
        return Collected(ordered, provenance)


@dataclass(frozen=True)
class SampleDomain:
    """One domain of the shipped sample corpus, as it is."""

    domain_name: str
    name: str = "sample"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        documents = tuple(
            Document(document_id(domain, self.name, d.id.replace("/", "_")), domain, d.text)
            for d in load_sample().documents[self.domain_name]
        )
        ordered = tuple(sorted(documents, key=lambda d: d.id))
        digest = hashlib.sha256("".join(d.text for d in ordered).encode()).hexdigest()
        provenance = Provenance(self.name, "shipped", "moekit.data.sample", "see sample/NOTICE.md", digest)
        return Collected(ordered, provenance)


@dataclass(frozen=True)
class ModelShape:
    """The benchmark model and its training run (the `corpus` command's options)."""

    steps: int = 1400
    layers: int = 6
    width: int = 128
    expert_ff: int = 128
    batch: int = 16
    lr: float = 4e-3
    checkpoint_every: int = 350


def build_corpus(out: Path, shape: ModelShape) -> None:
    """`math`: LEVEL_COUNTS problems per level (each LEVEL_REPEATS times); `cipher`: the next
    problems of each level, a CIPHER_SHARE-th as many, ciphered; `english`: the shipped
    sample's prose (the domain seen least)."""
    math_sources, cipher_sources = [], []
    for level, count in LEVEL_COUNTS.items():
        _, after = arithmetic_of_level(level, 0, count)
        repeats = LEVEL_REPEATS[level]
        math_sources.append(LevelArithmetic(level, 0, count, repeats=repeats))
        cipher_sources.append(
            LevelArithmetic(level, after, count // CIPHER_SHARE, ciphered=True, repeats=repeats)
        )
    recipe = Recipe(
        "test-time-routing",
        2,
        (
            DomainRecipe("math", tuple(math_sources)),
            DomainRecipe("cipher", tuple(cipher_sources)),
            DomainRecipe("english", (SampleDomain("english"),)),
        ),
    )
    context = BuildContext(download_dir=out / "downloads", offline=True)
    build_from_recipe(recipe, out / "corpus", context, fallback=None)
    config = CONFIG.format(
        out=out,
        steps=shape.steps,
        layers=shape.layers,
        width=shape.width,
        ff=4 * shape.width,
        expert_ff=shape.expert_ff,
        batch=shape.batch,
        lr=shape.lr,
        checkpoint_every=shape.checkpoint_every,
    )
    (out / "config.yaml").write_text(config)
    print(f"wrote {out / 'corpus'} and {out / 'config.yaml'}")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) of two distributions over experts."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        keep = a > 0
        return float((a[keep] * (a[keep] / b[keep]).log()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def extras(run: Path, corpus: Path, out: Path, items: int, windows: int) -> None:
    from moekit.data.corpus import open_corpus
    from moekit.data.splits import split_corpus
    from moekit.data.tokenizer import encode_prompt
    from moekit.inference.cli import load_for_generation
    from moekit.inference.methods.common import full_logits
    from moekit.inference.methods.rewire import rewire
    from moekit.inference.methods.steer import expert_frequencies
    from moekit.inference.methods.tasks import task_problems
    from moekit.routing.override import override_routing

    model, tokenizer, _ = load_for_generation(run)
    torch.manual_seed(0)

    def frequencies(problems: list[Any]) -> dict[int, torch.Tensor]:
        total: dict[int, torch.Tensor] = {}
        for problem in problems:
            ids = torch.tensor([encode_prompt(tokenizer, problem.prompt)])
            for index, value in expert_frequencies(model, ids).items():
                total[index] = total.get(index, 0) + value
        return total

    divergence = {}
    for level in (1, 2):
        plain = frequencies(task_problems("arithmetic", items, level=level))
        coded = frequencies(task_problems("arithmetic", items, level=level, ciphered=True))
        divergence[level] = [js_divergence(plain[i], coded[i]) for i in sorted(plain)]
        shown = " ".join(f"{d:.4f}" for d in divergence[level])
        print(f"level {level}: JS divergence per MoE layer, plain vs cipher prompts: {shown}")

    # Rewiring (#28): adapt the last two MoE layers' router biases on the first half of a held-out
    # window (5 Adam steps, lr 0.1), score the second half with and without them.
    splits = split_corpus(open_corpus(corpus))
    context = model.context_length
    rewiring = {}
    for domain in ("english", "math"):
        text = "".join(d.text + "\n" for d in splits.documents("test", domain))
        ids_all = tokenizer.encode(text)
        before, after, norms = [], [], []
        for start in range(0, min(len(ids_all) - context, windows * context), context):
            window = torch.tensor([ids_all[start : start + context]])
            half = context // 2
            adapted = rewire(model, window[:, :half], steps=5, lr=0.1)
            real = torch.ones_like(window, dtype=torch.bool)
            with torch.no_grad():
                before.append(continuation_loss(full_logits(model, window, real), window, half))
                with override_routing(model, adapted.overrides()):
                    after.append(continuation_loss(full_logits(model, window, real), window, half))
            norms.append(max(float(b.norm()) for b in adapted.biases.values()))
        rewiring[domain] = {
            "windows": len(before),
            "continuation_loss_base": statistics.fmean(before),
            "continuation_loss_rewired": statistics.fmean(after),
            "windows_improved": sum(a < b for a, b in zip(after, before, strict=True)),
            "median_bias_norm": statistics.median(norms),
        }
        print(domain, rewiring[domain])
    write_json_atomic(out / "extras.json", {"js_divergence_per_layer": divergence, "rewire": rewiring})


def continuation_loss(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Mean next-token cross-entropy (nats) of tokens start.. given everything before them."""
    targets = ids[0, start:]
    predicted = logits[0, start - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(predicted, targets)) if len(targets) else math.nan


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on the discordant pairs: the chance of a
    split at least this uneven if the method and the baseline were equally good."""
    from scipy.stats import binomtest

    return 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue


def summary(results: list[Path], baseline: Path | None) -> None:
    """A markdown row per result file: accuracy, Wilson 95% CI, cost per problem, and paired
    wins/losses against the baseline file (the same problems, in the same order)."""
    from moekit.io import read_json

    base_items = {}
    if baseline is not None:
        base_items = [item["correct"] for item in read_json(baseline)["items"]]
    header = "run | correct | accuracy (95% CI) | fwd/problem | bwd/problem | assignments/problem | tok/s"
    print(f"| {header} | vs base +/- | sign-test p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in results:
        result = read_json(path)
        n = result["problems"]
        low, high = result["ci95"]
        cost = result["cost"]
        paired, p_value = "", ""
        if base_items:
            # item i of every run is the same problem (ciphered or not): paired by position
            pairs = list(zip((i["correct"] for i in result["items"]), base_items, strict=True))
            wins = sum(ok and not base for ok, base in pairs)
            losses = sum(base and not ok for ok, base in pairs)
            paired = f"+{wins} / -{losses}"
            p_value = f"{sign_test(wins, losses):.3f}"
        print(
            f"| {path.stem} | {result['correct']}/{n} | {result['accuracy']:.3f} ({low:.3f}-{high:.3f}) "
            f"| {cost['forward_passes'] / n:.1f} | {cost['backward_passes'] / n:.1f} "
            f"| {cost['assignments'] / n:.0f} | {result['tokens_per_second']:.1f} | {paired} | {p_value} |"
        )


C3PO = ["--method", "c3po", "--c3po-references", "64", "--c3po-apply-to-new"]
ODP_IMPORTANCE = ["--method", "odp", "--odp-protect-fraction", "0.1", "--odp-threshold"]
RUNS: dict[str, list[str]] = {
    "none": ["--method", "none"],
    "scmoe": ["--method", "scmoe"],  # weak pass: top-1 of the top-2 model; beta 0.5, alpha 0.1
    "scmoe-rank2": ["--method", "scmoe", "--weak-rank", "2"],  # the paper's rank-k weak routing
    "des-k123": ["--method", "des", "--samples", "3", "--k-values", "1,2,3"],
    "des-k2": ["--method", "des", "--samples", "3", "--k-values", "2"],
    # references: those of 64 same-level problems the model solves (C3PO's "successful" set); the
    # re-mixed pathway routes the generated tokens too (the first new token is always the space
    # before the answer, so routing the last prompt token alone cannot change an answer)
    "c3po-ngd": [*C3PO, "--c3po-variant", "ngd"],
    "c3po-ngd-random": [*C3PO, "--c3po-variant", "ngd", "--c3po-neighbour-mode", "random"],
    "c3po-kernel": [*C3PO, "--c3po-variant", "kernel"],
    "c3po-kernel-random": [*C3PO, "--c3po-variant", "kernel", "--c3po-neighbour-mode", "random"],
    "c3po-kernel-prompt-only": ["--method", "c3po", "--c3po-references", "64", "--c3po-variant", "kernel"],
    "rewire": ["--method", "rewire"],
    "odp-0.25": ["--method", "odp", "--odp-threshold", "0.25"],
    "odp-0.5": ["--method", "odp", "--odp-threshold", "0.5"],
    "odp-0.75": ["--method", "odp", "--odp-threshold", "0.75"],
    "odp-1.0": ["--method", "odp", "--odp-threshold", "1.0"],
    # ODP's token-importance half: the least important τ_l of each prompt's tokens skip their routed
    # experts, the most important τ_h = 0.1 are spared the weight rule (the paper's 10% and 10%)
    "odp-b-0.1": [*ODP_IMPORTANCE, "0", "--odp-skip-fraction", "0.1"],
    "odp-b-0.2": [*ODP_IMPORTANCE, "0", "--odp-skip-fraction", "0.2"],
    "odp-b-0.3": [*ODP_IMPORTANCE, "0", "--odp-skip-fraction", "0.3"],
    "odp-b-0.2-position": [
        *ODP_IMPORTANCE,
        "0",
        "--odp-skip-fraction",
        "0.2",
        "--odp-importance",
        "position",
    ],
    # the paper's rule as written: the prompt's last token, whose output is the first answer
    # token's distribution, may be skipped too (by default it is spared)
    "odp-b-0.2-skip-last": [*ODP_IMPORTANCE, "0", "--odp-skip-fraction", "0.2", "--odp-skip-last-token"],
    "odp-0.25-b-0.1": [*ODP_IMPORTANCE, "0.25", "--odp-skip-fraction", "0.1"],
    "odp-0.25-b-0.2": [*ODP_IMPORTANCE, "0.25", "--odp-skip-fraction", "0.2"],
    "odp-0.5-b-0.1": [*ODP_IMPORTANCE, "0.5", "--odp-skip-fraction", "0.1"],
    "cipher-none": ["--method", "none", "--cipher"],
    "cipher-steer-first": ["--method", "steer", "--cipher", "--steer-layers", "0"],
    "cipher-steer-middle": ["--method", "steer", "--cipher", "--steer-layers", "2,3"],
    "cipher-steer-last": ["--method", "steer", "--cipher", "--steer-layers", "5"],
}


def measure(run: Path, out: Path, level: int, limit: int, names: list[str]) -> None:
    """`moekit eval-tasks` for each named run, in one process, each result in out/<name>.json."""
    from moekit.cli import main as moekit

    out.mkdir(parents=True, exist_ok=True)
    common = ["--set", "arithmetic", "--level", str(level), "--limit", str(limit), "--max-new-tokens", "8"]
    for name in names:
        args = ["eval-tasks", str(run), *common, *RUNS[name], "--json", str(out / f"{name}.json")]
        print("moekit " + " ".join(args), flush=True)
        if moekit(args) != 0:
            raise SystemExit(f"{name}: eval-tasks failed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="build the corpus and the training config")
    corpus.add_argument("--out", type=Path, default=Path("runs/ttr"))
    for field_name, default in vars(ModelShape()).items():
        corpus.add_argument(f"--{field_name.replace('_', '-')}", type=type(default), default=default)
    build = sub.add_parser("build", help="corpus, config and the trained model in one command")
    build.add_argument("--out", type=Path, default=Path("runs/ttr"))
    for field_name, default in vars(ModelShape()).items():
        build.add_argument(f"--{field_name.replace('_', '-')}", type=type(default), default=default)
    more = sub.add_parser("extras", help="routing divergence per layer, Rewiring continuation loss")
    more.add_argument("--run", type=Path, default=Path("runs/ttr/run"))
    more.add_argument("--corpus", type=Path, default=Path("runs/ttr/corpus"))
    more.add_argument("--out", type=Path, default=Path("runs/ttr"))
    more.add_argument("--items", type=int, default=64)
    more.add_argument("--windows", type=int, default=16)
    runs = sub.add_parser("measure", help="eval-tasks for every method (results in OUT/<name>.json)")
    runs.add_argument("--run", type=Path, default=Path("runs/ttr/run"))
    runs.add_argument("--out", type=Path, default=Path("runs/ttr/results"))
    runs.add_argument("--level", type=int, default=1)
    runs.add_argument("--limit", type=int, default=60)
    runs.add_argument("--only", nargs="+", default=list(RUNS), choices=list(RUNS))
    table = sub.add_parser("summary", help="a markdown table of eval-tasks JSON results")
    table.add_argument("results", type=Path, nargs="+")
    table.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    if args.command in ("corpus", "build"):
        shape = ModelShape(**{name: getattr(args, name) for name in vars(ModelShape())})
        build_corpus(args.out, shape)
        if args.command == "build":
            from moekit.cli import main as moekit

            # `build` trains the model anew: a run already there is replaced
            if moekit(["train", "--config", str(args.out / "config.yaml"), "--overwrite"]) != 0:
                raise SystemExit("training failed")
    elif args.command == "measure":
        measure(args.run, args.out, args.level, args.limit, args.only)
    elif args.command == "extras":
        extras(args.run, args.corpus, args.out, args.items, args.windows)
    else:
        summary(args.results, args.baseline)


if __name__ == "__main__":
    main()
