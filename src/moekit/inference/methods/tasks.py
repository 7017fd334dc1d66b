"""Exact-answer tasks for the test-time methods: the corpus's math problems, scored by accuracy
with a confidence interval, and the compute each method spent on them.

Problems come from `moekit.data.mathgen` with a seed the training corpus does not use by default
(`EVAL_SEED`), so a model trained on the built-in corpus has not seen these exact items.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.data.mathgen import PROBLEM_KINDS, MathProblem, generate_problem
from moekit.data.tokenizer import encode_prompt
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.inference.methods.c3po import Reference, c3po, c3po_generate, make_reference
from moekit.inference.methods.cipher import CipheredProblem
from moekit.inference.methods.cost import MethodCost
from moekit.inference.methods.des import des_search
from moekit.inference.methods.odp import odp_overrides
from moekit.inference.methods.rewire import rewire
from moekit.inference.methods.scmoe import scmoe_generate
from moekit.inference.methods.steer import expert_frequencies, steering_overrides
from moekit.routing.override import Overrides, RoutingCapture

EVAL_SEED = 90_001
TASK_SETS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("add", "sub", "mul", "div", "remainder", "expression"),
    "algebra": ("linear", "fraction", "polynomial", "system", "power", "percent", "gcd", "lcm", "modpow"),
    "all": PROBLEM_KINDS,
}
METHODS = ("none", "scmoe", "rewire", "steer", "odp", "des", "c3po", "premoe")
C3PO_REFERENCE_SEED = EVAL_SEED + 2  # C3PO's reference set: solved items of another stream


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001,
    eq. 4); 95% by default. Better than the normal interval at small n and extreme p."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


LEVELS = (1, 2, 3, 4)
_INTEGER = re.compile(r"\d+")


def problem_level(problem: MathProblem | CipheredProblem) -> int:
    """A problem's difficulty level: the digit count of the longest integer in its question
    (1: every number is a single digit ... 4: some number has four or more digits). Longer
    operands mean more carries and more answer digits, so accuracy falls with the level."""
    digits = [len(match) for match in _INTEGER.findall(problem.question)]
    return min(max(digits, default=1), LEVELS[-1])


def task_problems(
    task_set: str,
    limit: int,
    seed: int = EVAL_SEED,
    *,
    level: int | None = None,
    ciphered: bool = False,
) -> list[MathProblem] | list[CipheredProblem]:
    """The first `limit` problems of the seed's stream whose kind belongs to `task_set` (and, if
    given, whose `problem_level` is `level`); `ciphered` gives the same problems in the cipher
    language (`moekit.inference.methods.cipher`), parallel item by item."""
    if task_set not in TASK_SETS:
        raise ConfigError("set", f"got {task_set!r}, expected one of {', '.join(TASK_SETS)}")
    if level is not None and level not in LEVELS:
        raise ConfigError("level", f"got {level!r}, expected one of {', '.join(map(str, LEVELS))}")
    kinds = set(TASK_SETS[task_set])
    out: list[MathProblem] = []
    index = 0
    budget = 2000 * limit + 10_000  # the rarest level of a set is about 1 in 600 of its stream
    while len(out) < limit:
        if index >= budget:
            raise ConfigError(
                "level",
                f"found only {len(out)} problems of level {level} in set {task_set!r} "
                f"among the first {budget}; ask for fewer or another level",
            )
        problem = generate_problem(seed, index)
        index += 1
        if problem.kind in kinds and (level is None or problem_level(problem) == level):
            out.append(problem)
    if ciphered:
        return [CipheredProblem(problem) for problem in out]
    return out


@dataclass
class MethodSettings:
    """Each method's parameters (the papers' defaults where they give one)."""

    beta: float = 0.5
    alpha: float = 0.1
    weak_top_k: int = 1
    weak_ranks: Sequence[int] | None = None  # SCMoE rank-k weak routing instead of weak_top_k
    rewire_steps: int = 5
    rewire_lr: float = 0.1
    steer_strength: float = 1.0
    steer_top_n: int = 1
    steer_layers: Sequence[int] | None = None  # None: the middle MoE layer
    steer_references: int = 16
    steer_reference_set: str = "all"  # the plain-language problems whose experts are promoted
    steer_reference_level: int | None = None
    odp_threshold: float = 0.5
    odp_skip_fraction: float = 0.0  # MC-MoE's τ_l: the least important tokens skip their experts
    odp_protect_fraction: float = 0.0  # τ_h: the most important tokens are spared any pruning
    odp_skipped_top_k: int = 0  # experts a skipped token keeps (0: none, the paper's rule)
    odp_importance: str = "attention"  # or "position" (the released code's score)
    odp_spare_last_token: bool = True  # the prompt's last token is never skipped (see importance_split)
    des_samples: int = 8
    des_k_values: Sequence[int] | None = None  # None: the model's k and its neighbours
    des_temperature: float = 1.0
    c3po_variant: str = "ngd"  # or "kernel" (kernel regression)
    c3po_references: int = 64  # reference problems tried; the solved ones form the set
    c3po_reference_set: str = "all"  # their task set (the CLI default: the evaluated set)
    c3po_reference_level: int | None = None
    c3po_reference_ciphered: bool = False
    c3po_solved_only: bool = True  # False: every reference item, solved or not
    c3po_neighbours: int = 3
    c3po_neighbour_mode: str = "nearest"  # "random": the ablation
    c3po_kernel: str = "gaussian"
    c3po_steps: int = 10
    c3po_lr: float = 0.1
    c3po_layers: int | None = None  # None: the last 5/16 of the MoE layers
    c3po_core_experts: int | None = None  # None: max(2k, 20/64 of the experts)
    c3po_apply_to_new: bool = False
    premoe_masks: Any = None  # moekit.compress.premoe.DomainMasks: the per-domain masks to retrieve from


def _counting(cost: MethodCost) -> tuple[Overrides, Callable[[], None]]:
    capture = RoutingCapture()

    def flush() -> None:
        cost.assignments += sum(int(r.kept.token.numel()) for v in capture.routings.values() for r in v)
        capture.clear()

    return Overrides(capture=capture), flush


def c3po_reference_set(
    model: nn.Module,
    tokenizer: Any,
    settings: MethodSettings,
    max_new_tokens: int,
    eos_token_id: Any,
    cost: MethodCost,
) -> tuple[list[Reference], dict[str, int]]:
    """C3PO's reference set: the reference problems the model solves by greedy decoding (all of
    them with `c3po_solved_only=False`), each with its embedding and pathway; and its setup
    figures (problems tried, kept, forward passes)."""
    problems = task_problems(
        settings.c3po_reference_set,
        settings.c3po_references,
        seed=C3PO_REFERENCE_SEED,
        level=settings.c3po_reference_level,
        ciphered=settings.c3po_reference_ciphered,
    )
    passes = 0
    kept = []
    for problem in problems:
        prompt = encode_prompt(tokenizer, problem.prompt)
        if settings.c3po_solved_only:
            ids = torch.tensor([prompt], dtype=torch.long)
            out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
            passes += max(out.shape[1] - ids.shape[1], 1)
            if not problem.check(tokenizer.decode(out[0, ids.shape[1] :].tolist())):
                continue
        kept.append(make_reference(model, prompt, tokenizer.encode(" " + problem.answer)))
        passes += 1
    cost.forward_passes += passes
    if not kept:
        raise ConfigError(
            "c3po_references",
            f"the model solves none of the {len(problems)} reference problems; "
            "ask for more, or use unsolved ones too",
        )
    return kept, {"tried": len(problems), "kept": len(kept), "forward_passes": passes}


def _with_capture(overrides: Overrides, plain: Overrides) -> Overrides:
    return Overrides(overrides.layers, overrides.default, plain.capture)


def evaluate_method(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[MathProblem] | Sequence[CipheredProblem],
    method: str,
    settings: MethodSettings | None = None,
    max_new_tokens: int = 12,
    eos_token_id: Any = None,
) -> dict[str, Any]:
    """Accuracy (with a 95% Wilson interval) and cost of `method` on `problems`, greedy decoding
    (DES: best-of-N sampled trajectories, scored by the problem's own answer check, an oracle
    verifier; its items list which k values solved each problem; C3PO: its reference set is
    built first, its cost included and its size under "setup")."""
    if method not in METHODS:
        raise ConfigError("method", f"got {method!r}, expected one of {', '.join(METHODS)}")
    settings = settings or MethodSettings()
    cost = MethodCost()
    plain, flush = _counting(cost)
    steering = None
    if method == "steer":
        references = task_problems(
            settings.steer_reference_set,
            settings.steer_references,
            seed=EVAL_SEED + 1,
            level=settings.steer_reference_level,
        )
        frequency_sum: dict[int, torch.Tensor] = {}
        for reference in references:
            ids = torch.tensor([encode_prompt(tokenizer, reference.text)], dtype=torch.long)
            for index, value in expert_frequencies(model, ids).items():
                frequency_sum[index] = frequency_sum.get(index, 0) + value
        cost.forward_passes += len(references)
        layers = settings.steer_layers
        if layers is None:
            layers = [len(frequency_sum) // 2]
        steering = steering_overrides(
            frequency_sum, layers, strength=settings.steer_strength, top_n=settings.steer_top_n
        )
    references: list[Reference] = []
    setup: dict[str, int] | None = None
    if method == "c3po":
        references, setup = c3po_reference_set(model, tokenizer, settings, max_new_tokens, eos_token_id, cost)
    if problems:  # first-use measurements (threading, kernels) stay out of the timed loop
        warm = torch.tensor([encode_prompt(tokenizer, problems[0].prompt)], dtype=torch.long)
        generate(model, warm, max_new_tokens=1)
    correct = 0
    items = []
    start = time.perf_counter()
    generated_tokens = 0
    for problem in problems:
        ids = torch.tensor([encode_prompt(tokenizer, problem.prompt)], dtype=torch.long)
        extra: dict[str, Any] = {}
        if method == "des":
            search = des_search(
                model,
                ids,
                lambda new, problem=problem: float(problem.check(tokenizer.decode(new.tolist()))),
                k_values=settings.des_k_values,
                samples=settings.des_samples,
                max_new_tokens=max_new_tokens,
                temperature=settings.des_temperature,
                eos_token_id=eos_token_id,
            )
            out = search.tokens
            cost.forward_passes += search.cost.forward_passes
            cost.assignments += search.cost.assignments
            extra = {
                "k": search.trajectories[search.best].k,
                "solved_by_k": sorted({t.k for t in search.trajectories if t.score > 0}),
            }
        elif method == "c3po":
            prompt = ids[0].tolist()
            remix = c3po(
                model,
                prompt,
                references,
                variant=settings.c3po_variant,
                layers=settings.c3po_layers,
                neighbours=settings.c3po_neighbours,
                neighbour_mode=settings.c3po_neighbour_mode,
                kernel=settings.c3po_kernel,
                steps=settings.c3po_steps,
                lr=settings.c3po_lr,
                core_experts=settings.c3po_core_experts,
                apply_to_new=settings.c3po_apply_to_new,
                seed=len(items),
            )
            cost.forward_passes += remix.cost.forward_passes
            cost.backward_passes += remix.cost.backward_passes
            out, spent = c3po_generate(
                model,
                prompt,
                remix.pathway,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                apply_to_new=settings.c3po_apply_to_new,
                capture=plain.capture,
            )
            cost.forward_passes += spent.forward_passes
            flush()
            extra = {
                "neighbour_loss_before": remix.loss_before,
                "neighbour_loss_after": remix.loss_after,
                "alpha": remix.alpha,
            }
        elif method == "scmoe":
            result = scmoe_generate(
                model,
                ids,
                max_new_tokens=max_new_tokens,
                beta=settings.beta,
                alpha=settings.alpha,
                weak_top_k=settings.weak_top_k,
                weak_ranks=settings.weak_ranks,
                eos_token_id=eos_token_id,
            )
            out = result.tokens
            cost.forward_passes += result.cost.forward_passes
            cost.assignments += result.cost.assignments
        else:
            overrides = plain
            if method == "rewire":
                adapted = rewire(model, ids, steps=settings.rewire_steps, lr=settings.rewire_lr)
                cost.forward_passes += adapted.cost.forward_passes
                cost.backward_passes += adapted.cost.backward_passes
                overrides = Overrides(layers=adapted.overrides(), capture=plain.capture)
            elif method == "steer":
                assert steering is not None
                overrides = _with_capture(steering, plain)
            elif method == "odp":
                odp = odp_overrides(
                    settings.odp_threshold,
                    skip_fraction=settings.odp_skip_fraction,
                    protect_fraction=settings.odp_protect_fraction,
                    skipped_top_k=settings.odp_skipped_top_k,
                    importance=settings.odp_importance,
                    spare_last_token=settings.odp_spare_last_token,
                )
                overrides = _with_capture(odp, plain)
            elif method == "premoe":
                if settings.premoe_masks is None:
                    raise ConfigError("premoe_masks", "method premoe needs the PreMoe masks")
                domain, _ = settings.premoe_masks.retrieve(model, ids)
                cost.forward_passes += 1  # the query's forward over the prompt's first tokens
                overrides = settings.premoe_masks.overrides(domain, plain.capture)
                extra = {"domain": settings.premoe_masks.domains[domain]}
            out = generate(
                model, ids, max_new_tokens=max_new_tokens, overrides=overrides, eos_token_id=eos_token_id
            )
            cost.forward_passes += max(out.shape[1] - ids.shape[1], 1)
            flush()
        new = out[0, ids.shape[1] :].tolist()
        generated_tokens += len(new)
        text = tokenizer.decode(new)
        ok = problem.check(text)
        correct += ok
        items.append(
            {"question": problem.question, "answer": problem.answer, "output": text, "correct": ok, **extra}
        )
    seconds = time.perf_counter() - start
    low, high = wilson_interval(correct, len(problems))
    extras: dict[str, Any] = {} if setup is None else {"setup": setup}
    return {
        **extras,
        "method": method,
        "problems": len(problems),
        "correct": correct,
        "accuracy": correct / len(problems) if problems else 0.0,
        "ci95": [low, high],
        "cost": cost.as_dict(),
        "seconds": seconds,
        "tokens_per_second": generated_tokens / seconds if seconds > 0 else None,
        "items": items,
    }
