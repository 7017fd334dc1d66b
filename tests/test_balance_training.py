"""`accumulate_gradients` on a tiny float64 MoE model: the same global batch, however it is split
(accumulation steps, gloo ranks, padded or packed rows), gives the same objective values, the same
gradients and the same bias update; padding changes nothing; aux gradients exist exactly when their
coefficient is non-zero."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from moekit import MoE, MoEConfig, preset
from moekit.balance import (
    BalanceConfig,
    ForwardOutput,
    ObjectiveSpec,
    RoutingStats,
    Schedule,
    accumulate_gradients,
    apply_bias_updates,
    diagnose,
    summed_cross_entropy,
)
from moekit.balance.lm_loss import IGNORE_INDEX, count_target_tokens
from moekit.errors import MoekitError

HIDDEN, VOCAB, EXPERTS, TOP_K = 8, 13, 6, 2
RTOL = 1e-9
BIAS_RATE = 0.01


class TinyMoELM(nn.Module):
    """embedding → MoE (DeepSeek-V3 sigmoid router with a selection bias) + residual → MoE (Qwen3
    softmax router) + residual → linear head. No attention, so every token is computed on its own
    and padded and packed rows hold exactly the same computation."""

    def __init__(self, jitter_eps: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        deepseek = preset("deepseek_v3", EXPERTS, TOP_K)
        qwen = preset("qwen3_moe", EXPERTS, TOP_K, jitter_eps=jitter_eps)
        self.moe1 = MoE(MoEConfig(HIDDEN, 6, deepseek, num_shared_experts=1))
        self.moe2 = MoE(MoEConfig(HIDDEN, 6, qwen))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: Tensor, token_mask: Tensor):
        x = self.embed(tokens)
        y1, r1 = self.moe1.forward_with_routing(x, token_mask)
        h = x + y1
        y2, r2 = self.moe2.forward_with_routing(h, token_mask)
        return self.head(h + y2), [r1, r2]


def build_model(jitter_eps: float = 0.0) -> TinyMoELM:
    torch.manual_seed(1234)
    model = TinyMoELM(jitter_eps).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
        model.moe1.router.selection_bias.normal_(0, 0.1)
    return model


@dataclass
class Batch:
    tokens: Tensor  # [B, L]
    targets: Tensor  # [B, L], IGNORE_INDEX where no target
    token_mask: Tensor  # [B, L] bool
    doc_ids: Tensor | None = None  # [B, L], -1 on padding

    @property
    def num_loss_tokens(self) -> int:
        return count_target_tokens(self.targets)


def documents(count: int = 16, seed: int = 7) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (count,), generator=gen)
    return [torch.randint(1, VOCAB, (int(n),), generator=gen) for n in lengths]


def _row(docs: list[Tensor], row_len: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """One row holding `docs` back to back, then padding with random token ids (which must not matter)."""
    tokens = torch.randint(0, VOCAB, (row_len,), generator=gen)
    targets = torch.full((row_len,), IGNORE_INDEX)
    mask = torch.zeros(row_len, dtype=torch.bool)
    doc_ids = torch.full((row_len,), -1)
    at = 0
    for d, doc in enumerate(docs):
        n = len(doc)
        tokens[at : at + n] = doc
        targets[at : at + n - 1] = doc[1:]
        mask[at : at + n] = True
        doc_ids[at : at + n] = d
        at += n
    assert at <= row_len
    return tokens, targets, mask, doc_ids


def layout_rows(layout: str, docs: list[Tensor], seed: int = 0) -> list[tuple[Tensor, ...]]:
    """`padded`: one document per row, padded to 7; `packed`: two documents per row of 14."""
    gen = torch.Generator().manual_seed(100 + seed)
    if layout == "padded":
        return [_row([doc], 7, gen) for doc in docs]
    return [_row(docs[i : i + 2], 14, gen) for i in range(0, len(docs), 2)]


def micro_batches(rows: list[tuple[Tensor, ...]], count: int, packed: bool) -> list[Batch]:
    per = len(rows) // count
    out = []
    for i in range(count):
        chunk = rows[i * per : (i + 1) * per]
        tokens, targets, mask, doc_ids = (torch.stack(t) for t in zip(*chunk, strict=True))
        out.append(Batch(tokens, targets, mask, doc_ids if packed else None))
    return out


def global_batch(layout: str, count: int) -> list[Batch]:
    return micro_batches(layout_rows(layout, documents()), count, packed=layout == "packed")


def objective(kind: str, scope: str, coefficient: float = 1.0) -> ObjectiveSpec:
    return ObjectiveSpec(kind, scope, Schedule.constant(coefficient))


# name -> (objectives, LM loss weight). With the LM loss off, the gradient is the objective's alone.
INVARIANT_CONFIGS = {
    "lm": ((), 1.0),
    "load_balance/global": ((objective("load_balance", "global"),), 0.0),
    "load_balance/sequence": ((objective("load_balance", "sequence"),), 0.0),
    "z_loss/global": ((objective("z_loss", "global"),), 0.0),
    "z_loss/sequence": ((objective("z_loss", "sequence"),), 0.0),
    "entropy/global": ((objective("entropy", "global"),), 0.0),
    "entropy/sequence": ((objective("entropy", "sequence"),), 0.0),
    "combined": (
        (
            objective("load_balance", "global", 0.01),
            objective("load_balance", "sequence", 0.003),
            objective("z_loss", "global", 0.001),
            objective("entropy", "sequence", 0.1),
        ),
        1.0,
    ),
}
MICRO_BATCH_CONFIGS = {
    "load_balance/micro_batch": ((objective("load_balance", "micro_batch"),), 0.0),
    "z_loss/micro_batch": ((objective("z_loss", "micro_batch"),), 0.0),
    "entropy/micro_batch": ((objective("entropy", "micro_batch"),), 0.0),
}
ALL_CONFIGS = {**INVARIANT_CONFIGS, **MICRO_BATCH_CONFIGS}


@dataclass
class Result:
    objectives: dict[str, float]
    lm_loss: float
    loss: float
    grads: dict[str, Tensor]
    counts: list[Tensor]
    biases: dict[str, Tensor]
    counting_pass: bool


def forward_fn(model: TinyMoELM, lm_weight: float = 1.0):
    def run(mb: Batch) -> ForwardOutput:
        logits, routings = model(mb.tokens, mb.token_mask)
        return ForwardOutput(lm_weight * summed_cross_entropy(logits, mb.targets), routings)

    return run


def run_step(
    model: TinyMoELM, batches: list[Batch], config_name: str, group=None, step: int = 0, configs=None
) -> Result:
    """One step; gradients summed over ranks (what DDP does, with a summing hook); bias updated on a copy."""
    objectives, lm_weight = (configs or ALL_CONFIGS)[config_name]
    config = BalanceConfig(objectives, Schedule.constant(BIAS_RATE))
    model.zero_grad(set_to_none=True)
    report = accumulate_gradients(forward_fn(model, lm_weight), batches, config, step, group)
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if group is not None:
            dist.all_reduce(grad, group=group)
        grads[name] = grad
    updated = copy.deepcopy(model)
    apply_bias_updates(updated, report.expert_counts, config.bias_update_rate.value(step))
    biases = {name: b.clone() for name, b in updated.named_buffers() if name.endswith("selection_bias")}
    return Result(
        report.objectives,
        report.lm_loss,
        report.loss,
        grads,
        report.expert_counts,
        biases,
        report.counting_pass,
    )


def assert_same_result(result: Result, reference: Result, what: str) -> None:
    """Every value and gradient within relative error RTOL (float64), counts and bias exactly."""
    assert result.objectives.keys() == reference.objectives.keys(), what
    for name, value in [
        *reference.objectives.items(),
        ("lm_loss", reference.lm_loss),
        ("loss", reference.loss),
    ]:
        got = result.objectives.get(name, getattr(result, name, None))
        assert abs(got - value) <= RTOL * abs(value), f"{what}: {name} = {got!r}, expected {value!r}"
    for name, grad in reference.grads.items():
        error = float((result.grads[name] - grad).norm())
        assert error <= RTOL * float(grad.norm()), (
            f"{what}: grad of {name}, relative error {error / grad.norm():.3g}"
        )
    for got, expected in zip(result.counts, reference.counts, strict=True):
        assert torch.equal(got, expected), f"{what}: expert counts {got.tolist()} != {expected.tolist()}"
    for name, bias in reference.biases.items():
        assert result.biases[name].dtype == bias.dtype
        assert torch.equal(result.biases[name], bias), f"{what}: {name} after the update"


def assert_router_gradient(result: Result, what: str) -> None:
    for name, grad in result.grads.items():
        if name.endswith("router.weight"):
            assert float(grad.norm()) > 0, f"{what}: {name} has no gradient"


def world1_results(model: TinyMoELM) -> dict[tuple[str, int, str], Result]:
    """(layout, micro-batches, config) -> result with every micro-batch accumulated on one rank."""
    results = {}
    for layout in ("padded", "packed"):
        for count in (1, 2, 4, 8):
            batches = global_batch(layout, count)
            for name in ALL_CONFIGS:
                results[(layout, count, name)] = run_step(model, batches, name)
    return results


@pytest.fixture(scope="module")
def model() -> TinyMoELM:
    return build_model()


@pytest.fixture(scope="module")
def single_rank(model) -> dict[tuple[str, int, str], Result]:
    return world1_results(model)


@pytest.mark.parametrize("config_name", list(INVARIANT_CONFIGS))
def test_split_invariance_accumulation_and_packing(single_rank, config_name):
    """GA ∈ {1, 2, 4, 8} on one rank, padded or packed rows: identical to one padded micro-batch."""
    reference = single_rank[("padded", 1, config_name)]
    if config_name != "lm":
        assert_router_gradient(reference, config_name)
    for layout in ("padded", "packed"):
        for count in (1, 2, 4, 8):
            result = single_rank[(layout, count, config_name)]
            assert_same_result(result, reference, f"{config_name}, {layout}, GA={count}")
    assert single_rank[("padded", 4, "load_balance/global")].counting_pass
    assert not single_rank[("padded", 1, "load_balance/global")].counting_pass


def test_micro_batch_scope_depends_on_the_micro_batches_by_definition(single_rank):
    """The legacy scope is a mean of per-micro-batch losses: regrouping tokens changes it (P1)."""
    one = single_rank[("padded", 1, "load_balance/micro_batch")].objectives["load_balance/micro_batch"]
    four = single_rank[("padded", 4, "load_balance/micro_batch")].objectives["load_balance/micro_batch"]
    assert abs(one - four) > 1e-6 * abs(one)


# --- world size 2: two gloo processes on this machine --------------------------------------------


def _world2_worker(rank: int, world_size: int, store: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = build_model()
        group = dist.group.WORLD
        results = {}
        for layout in ("padded", "packed"):
            for count in (2, 4, 8):
                per_rank = count // world_size
                batches = global_batch(layout, count)[rank * per_rank : (rank + 1) * per_rank]
                for name in ALL_CONFIGS:
                    results[(layout, count, name)] = run_step(model, batches, name, group)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[tuple[str, int, str], Result]]:
    """Both ranks' results (after the gradient all-reduce), from one spawned gloo run."""
    tmp = tmp_path_factory.mktemp("gloo")
    out = tmp / "results.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_world2_worker, args=(2, str(tmp / "store"), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.distributed
@pytest.mark.parametrize("config_name", list(INVARIANT_CONFIGS))
def test_split_invariance_two_gloo_ranks(two_ranks, single_rank, config_name):
    """World size 2 with GA ∈ {1, 2, 4} per rank, padded and packed: identical to one rank, GA=1."""
    reference = single_rank[("padded", 1, config_name)]
    for rank, results in enumerate(two_ranks):
        for layout in ("padded", "packed"):
            for count in (2, 4, 8):
                what = f"{config_name}, {layout}, world=2 x GA={count // 2}, rank {rank}"
                assert_same_result(results[(layout, count, config_name)], reference, what)
    assert not two_ranks[0][("padded", 2, "load_balance/global")].counting_pass  # GA=1: counts all-reduced
    assert two_ranks[0][("padded", 4, "load_balance/global")].counting_pass


@pytest.mark.distributed
@pytest.mark.parametrize("config_name", list(MICRO_BATCH_CONFIGS))
def test_split_invariance_micro_batch_scope_layout(two_ranks, single_rank, config_name):
    """The same micro-batches as GA=n on one rank or GA=n/2 on each of two ranks: identical (P1/P2)."""
    for rank, results in enumerate(two_ranks):
        for layout in ("padded", "packed"):
            for count in (2, 4, 8):
                what = f"{config_name}, {layout}, {count} micro-batches, world 2 vs 1, rank {rank}"
                reference = single_rank[(layout, count, config_name)]
                assert_router_gradient(reference, what)
                assert_same_result(results[(layout, count, config_name)], reference, what)


# --- padding, masks, coefficients, the counting pass -----------------------------------------------


def padded_more(batches: list[Batch], seed: int = 3) -> list[Batch]:
    """The same micro-batches with 5 more padding columns, an all-padding row in each, and one more
    micro-batch that is all padding; padding token ids are random."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for mb in [*batches, None]:
        if mb is None:
            rows, cols = 2, batches[0].tokens.shape[1] + 5
            tokens = torch.zeros(0, cols, dtype=torch.long)
            targets, mask, docs = tokens.clone(), torch.zeros(0, cols, dtype=torch.bool), tokens.clone()
        else:
            rows, cols = mb.tokens.shape[0] + 1, mb.tokens.shape[1] + 5
            tokens, targets, mask = mb.tokens, mb.targets, mb.token_mask
            docs = mb.doc_ids if mb.doc_ids is not None else torch.zeros_like(tokens)
        new_tokens = torch.randint(0, VOCAB, (rows, cols), generator=gen)
        new_targets = torch.full((rows, cols), IGNORE_INDEX)
        new_mask = torch.zeros(rows, cols, dtype=torch.bool)
        new_docs = torch.full((rows, cols), -1)
        n, length = tokens.shape
        new_tokens[:n, :length] = torch.where(mask, tokens, new_tokens[:n, :length])
        new_targets[:n, :length], new_mask[:n, :length], new_docs[:n, :length] = targets, mask, docs
        keep_docs = mb is not None and mb.doc_ids is not None
        out.append(Batch(new_tokens, new_targets, new_mask, new_docs if keep_docs else None))
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_padding_changes_nothing(model, single_rank, layout):
    """More padding (columns, rows, a whole micro-batch) leaves every objective, gradient and count."""
    batches = padded_more(global_batch(layout, 2))
    for name in ALL_CONFIGS:
        assert_same_result(
            run_step(model, batches, name), single_rank[(layout, 2, name)], f"{name}, {layout}"
        )


def test_padding_changes_no_statistic(model):
    plain = global_batch("padded", 1)[0]
    padded = padded_more([plain])[0]
    with torch.no_grad():
        _, routings = model(plain.tokens, plain.token_mask)
        _, padded_routings = model(padded.tokens, padded.token_mask)
    for a, b in zip(routings, padded_routings, strict=True):
        sa, sb = RoutingStats.from_routing(a), RoutingStats.from_routing(b)
        assert torch.equal(sa.chosen_counts, sb.chosen_counts) and torch.equal(sa.kept_counts, sb.kept_counts)
        assert int(sa.num_tokens) == int(sb.num_tokens)
        for x, y in [(sa.prob_sums, sb.prob_sums), (sa.z_sum, sb.z_sum), (sa.entropy_sum, sb.entropy_sum)]:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=0)


@pytest.mark.parametrize("config_name", list(MICRO_BATCH_CONFIGS) + list(INVARIANT_CONFIGS)[1:-1])
def test_aux_gradient_is_nonzero_exactly_when_its_coefficient_is(model, config_name):
    batches = global_batch("packed", 2)
    (spec,), _ = ALL_CONFIGS[config_name]
    configs = {}
    for c in (0.3, 0.0):
        configs[f"aux {c}"] = ((ObjectiveSpec(spec.kind, spec.scope, Schedule.constant(c)),), 0.0)
        configs[f"lm + aux {c}"] = ((ObjectiveSpec(spec.kind, spec.scope, Schedule.constant(c)),), 1.0)
    configs["lm"] = ((), 1.0)
    on = run_step(model, batches, "aux 0.3", configs=configs)
    off = run_step(model, batches, "aux 0.0", configs=configs)
    assert_router_gradient(on, config_name)
    assert on.objectives[spec.name] > 0 and off.objectives[spec.name] == on.objectives[spec.name]
    assert all(float(g.abs().max()) == 0 for g in off.grads.values())
    lm = run_step(model, batches, "lm", configs=configs)
    lm_off = run_step(model, batches, "lm + aux 0.0", configs=configs)
    assert all(torch.equal(lm.grads[n], lm_off.grads[n]) for n in lm.grads)
    lm_on = run_step(model, batches, "lm + aux 0.3", configs=configs)
    for name, grad in on.grads.items():  # the aux gradient adds to the LM gradient
        torch.testing.assert_close(lm_on.grads[name], lm.grads[name] + grad, rtol=1e-10, atol=1e-12)


def test_annealed_coefficient_reaches_zero(model):
    batches = global_batch("padded", 2)
    annealed = ObjectiveSpec("load_balance", "global", Schedule.linear(0.2, 0.0, 10))
    configs = {"annealed": ((annealed,), 1.0), "lm": ((), 1.0)}
    lm = run_step(model, batches, "lm", configs=configs)
    end = run_step(model, batches, "annealed", step=10, configs=configs)
    middle = run_step(model, batches, "annealed", step=5, configs=configs)
    assert all(torch.equal(lm.grads[n], end.grads[n]) for n in lm.grads)
    assert float((middle.grads["moe1.router.weight"] - lm.grads["moe1.router.weight"]).norm()) > 0
    assert abs(middle.loss - (middle.lm_loss + 0.1 * middle.objectives["load_balance/global"])) < 1e-12


def test_counting_pass_sees_the_same_routing_under_router_jitter():
    """Jitter draws from the RNG: the pre-pass restores the RNG state, so its counts are those of
    the real pass; the step checks this, and the counts match an independent replay."""
    model = build_model(jitter_eps=0.3).train()
    batches = global_batch("padded", 4)
    config = BalanceConfig((objective("load_balance", "global", 0.01),))
    torch.manual_seed(5)
    report = accumulate_gradients(forward_fn(model), batches, config, 0)
    assert report.counting_pass
    torch.manual_seed(5)
    with torch.no_grad():
        replay = [model(mb.tokens, mb.token_mask)[1] for mb in batches]
    for layer, counts in enumerate(report.expert_counts):
        assert torch.equal(counts, sum(r[layer].chosen_counts for r in replay))


def test_routing_that_changes_between_passes_is_an_error(model):
    calls = []

    def unstable(mb: Batch) -> ForwardOutput:
        calls.append(1)
        with torch.no_grad():
            model.moe2.router.weight[len(calls) % EXPERTS] += 3.0  # drifts: each pass routes differently
        return forward_fn(model)(mb)

    config = BalanceConfig((objective("load_balance", "global", 0.01),))
    saved = model.moe2.router.weight.detach().clone()
    try:
        with pytest.raises(MoekitError, match="counting pass"):
            accumulate_gradients(unstable, global_batch("padded", 2), config, 0)
    finally:
        with torch.no_grad():
            model.moe2.router.weight.copy_(saved)


def test_a_routing_without_the_micro_batch_mask_is_refused(model):
    """A model that forgets to pass the token mask would count padding (P3): refused loudly."""

    def unmasked(mb: Batch) -> ForwardOutput:
        logits, routings = model(mb.tokens, torch.ones_like(mb.token_mask))
        return ForwardOutput(summed_cross_entropy(logits, mb.targets), routings)

    with pytest.raises(MoekitError, match="token_mask"):
        accumulate_gradients(unmasked, global_batch("padded", 2), BalanceConfig(), 0)


def test_step_diagnostics_describe_the_global_batch(model):
    """Diagnostics from four accumulated micro-batches = diagnostics of one pass over the batch."""
    config = BalanceConfig((objective("load_balance", "global", 0.01),))
    report = accumulate_gradients(forward_fn(model), global_batch("packed", 4), config, 0)
    whole = global_batch("packed", 1)[0]
    with torch.no_grad():
        _, routings = model(whole.tokens, whole.token_mask)
    for got, routing in zip(report.diagnostics, routings, strict=True):
        expected = diagnose(routing)
        assert got.dead_experts == expected.dead_experts and got.num_tokens == expected.num_tokens
        for name in ("load_cv", "max_over_mean_load", "router_entropy", "drop_rate"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-12)
    logged = report.log_dict("train/")
    assert logged["train/load_balance/global"] == report.objectives["load_balance/global"]
    assert logged["train/layer1/load_cv"] == report.diagnostics[1].load_cv
