"""C3PO: re-mix a test item's routing weights from its solved neighbours, at test time.

Li et al. 2025, "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for
Test-Time Expert Re-Mixing" (#29). A pathway ω is the routing-weight vectors of a sample's last
token in the critical layers. A reference set holds solved items (x_i, y_i) with their pathways
ω_i; the test item's neighbours N(x) are found in embedding space and its pathway is re-mixed by

- kernel regression (eq. 4 of the paper's surrogates): ω̂ = Σ K(x_i, x) ω_i / Σ K, then
  ω ← α ω + (1 − α) ω̂ with α chosen (from `alphas`) to minimise the neighbours' loss; or
- Neighbourhood Gradient Descent (NGD, eq. 6): a few steps on the kernel-weighted neighbours'
  loss Σ K(x_i, x) ℓ(f(x_i; ω), y_i) / Σ K over ω, the test item's own pathway as the start,
  only the core experts' weights free.

Choices the paper leaves open, each a parameter here:
- embedding: the mean over the prompt's tokens of the model's final normalised hidden state (the
  LM head's input), so no separate sentence embedder is needed;
- neighbours: the `neighbours` nearest references by Euclidean distance of embeddings (or, as the
  ablation, `neighbour_mode="random"`);
- kernel: Gaussian exp(−d²/2h²) with bandwidth h the median distance to the chosen neighbours
  (`kernel="gaussian"`), or the cosine similarity clipped at 0 as in the released code;
- the pathway is the router's score vector (softmax probabilities for softmax routers) of the last
  prompt token; the re-mixed ω chooses its top-k experts (selection bias and group limits as the
  router) with the chosen weights renormalised by the router's own rule, applied through the
  routing override (`force` the chosen experts, replacement `weights`) at the last prompt token
  only (`apply_to_new=True` also applies it to every generated token, as the released code's
  KV-cached generation does);
- critical layers: the last ⌈5/16⌉ of the MoE layers (the paper's last 5 of 16; the last 2 of 6);
- core experts: each critical layer's `core_experts` experts of largest weight in the item's own
  pathway (default max(2k, ⌈20/64 · E⌉), the paper's top 20 of 64); NGD moves their weights as
  ω_e = ω⁰_e · exp(θ_e) (renormalised to a distribution for softmax routers), so θ = 0 is the
  model's own routing, with Adam at `lr` for `steps` steps; the pathway kept is the one of lowest
  neighbour loss seen (the start included);
- the neighbours' loss ℓ: mean cross-entropy of the reference's answer tokens, with the pathway
  applied at the reference's last prompt token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.addressing import require_moe_layers
from moekit.errors import ConfigError, require_choice, require_int, require_number
from moekit.inference.generate import _check_inputs, _forward, _model_kind
from moekit.inference.methods.common import full_logits, positions_of
from moekit.inference.methods.cost import MethodCost
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing
from moekit.routing.selection import renormalise_selected
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import group_limited, score

VARIANTS = ("ngd", "kernel")
KERNELS = ("gaussian", "cosine")
NEIGHBOUR_MODES = ("nearest", "random")


# ----- the paper's formulas, as pure functions -----


def gaussian_kernel(distances: Tensor, bandwidth: float) -> Tensor:
    """K(x_i, x) = exp(−‖x_i − x‖² / 2h²) (C3PO §3.2, the Gaussian kernel it finds best)."""
    return torch.exp(-(distances**2) / (2 * bandwidth**2))


def cosine_kernel(references: Tensor, query: Tensor) -> Tensor:
    """K(x_i, x) = max(cos(x_i, x), 0): the similarity weighting of C3PO's released code."""
    return torch.nn.functional.cosine_similarity(references, query[None], dim=-1).clamp_min(0.0)


def kernel_regression(kernel: Tensor, pathways: Tensor) -> Tensor:
    """ω̂ = Σ_i K_i ω_i / Σ_i K_i (C3PO eq. 4, Nadaraya-Watson): `kernel` [N], `pathways` [N, E]."""
    total = kernel.sum()
    if float(total) <= 0:
        return pathways.mean(dim=0)
    return (kernel[:, None] * pathways).sum(dim=0) / total


def blend(own: Tensor, target: Tensor, alpha: float) -> Tensor:
    """ω ← α ω + (1 − α) ω̂ (C3PO eq. 4 and the mean-shift update eq. 3)."""
    return alpha * own + (1.0 - alpha) * target


def core_scaled(own: Tensor, theta: Tensor, core: Tensor, normalise: bool) -> Tensor:
    """NGD's free pathway: ω_e = ω⁰_e · exp(θ_e) on core experts, ω⁰_e elsewhere, renormalised to
    a distribution when the router's scores are one (θ = 0 gives ω⁰)."""
    out = own * torch.exp(torch.where(core, theta, torch.zeros_like(theta)))
    return out / out.sum() if normalise else out


def pathway_routing(
    pathway: Tensor, spec: RouterSpec, selection_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(chosen experts bool [E], routing weights [E]) that a pathway (score vector) gives under
    the router's own rule: top-k on the scores plus any selection bias within the allowed groups,
    the chosen scores renormalised and scaled as the router does (a softmax over the chosen
    logits, for routers that score after top-k, is the renormalised softmax)."""
    preference = pathway.detach().float()
    if selection_bias is not None:
        preference = preference + selection_bias.detach().float()
    preference = preference[None]
    if spec.num_groups > 1:
        preference = group_limited(preference, spec.num_groups, spec.topk_groups, spec.group_score)
    chosen = torch.zeros_like(preference, dtype=torch.bool)
    chosen.scatter_(1, preference.topk(spec.top_k, dim=-1).indices, True)
    weights = torch.where(chosen, pathway[None], torch.zeros_like(pathway[None]))
    if spec.score_timing == "after_topk" and spec.score_fn == "softmax":
        weights = weights / weights.sum(-1, keepdim=True)
    weights = renormalise_selected(weights, chosen, spec)
    return chosen[0], weights[0]


# ----- embeddings, pathways and the reference set -----


@dataclass
class Reference:
    """A solved item: prompt and answer token ids, its embedding [H] and its pathway
    {MoE-layer index: ω [E]} (every MoE layer; C3PO reads the critical ones)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    embedding: Tensor
    pathway: dict[int, Tensor]


@torch.no_grad()
def embed_and_route(model: nn.Module, prompt_ids: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
    """One forward of a prompt: its embedding (mean final normalised hidden state [H]) and its
    pathway {MoE-layer index: the last token's router scores [E]}."""
    layers = require_moe_layers(model, "C3PO")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    real = _check_inputs(model, ids, None, 0)
    captured: list[Tensor] = []
    hook = model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    capture = RoutingCapture()
    was_training = model.training
    model.eval()
    try:
        with override_routing(model, Overrides(capture=capture)):
            full_logits(model, ids, real)
    finally:
        hook.remove()
        model.train(was_training)
    embedding = captured[-1][0].float().mean(dim=0)
    pathway = {}
    for index, _, layer in layers:
        routing = capture.routings[index][-1]
        pathway[index] = score(routing.logits[-1].float(), layer.config.router.score_fn)
    return embedding, pathway


def make_reference(model: nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Reference:
    if not answer_ids:
        raise ConfigError("answer_ids", "a reference needs at least one answer token")
    embedding, pathway = embed_and_route(model, prompt_ids)
    return Reference(list(prompt_ids), list(answer_ids), embedding, pathway)


def critical_layers(model: nn.Module, count: int | None = None) -> list[int]:
    """The last `count` MoE layers (default ⌈5/16 · layers⌉, C3PO's last 5 of 16)."""
    layers = require_moe_layers(model, "C3PO")
    if count is None:
        count = max(1, math.ceil(len(layers) * 5 / 16))
    require_int("layers", count, minimum=1)
    if count > len(layers):
        raise ConfigError("layers", f"got {count} critical layers, the model has {len(layers)} MoE layers")
    return [index for index, _, _ in layers[-count:]]


def default_core_experts(spec: RouterSpec) -> int:
    return min(spec.num_experts, max(2 * spec.top_k, math.ceil(spec.num_experts * 20 / 64)))


def choose_neighbours(
    embedding: Tensor,
    references: Sequence[Reference],
    count: int,
    *,
    mode: str = "nearest",
    kernel: str = "gaussian",
    seed: int = 0,
) -> tuple[list[int], Tensor]:
    """Indices of the neighbours and their kernel weights K(x_i, x) [N]."""
    require_choice("neighbour_mode", mode, NEIGHBOUR_MODES)
    require_choice("kernel", kernel, KERNELS)
    require_int("neighbours", count, minimum=1)
    if not references:
        raise ConfigError("references", "the reference set is empty; C3PO needs solved items")
    count = min(count, len(references))
    stacked = torch.stack([r.embedding for r in references])
    distances = (stacked - embedding[None]).norm(dim=-1)
    if mode == "nearest":
        chosen = distances.topk(count, largest=False).indices.tolist()
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(references), generator=generator)[:count].tolist()
    if kernel == "cosine":
        weights = cosine_kernel(stacked[chosen], embedding)
    else:
        bandwidth = float(distances[chosen].median())
        weights = gaussian_kernel(distances[chosen], bandwidth) if bandwidth > 0 else torch.ones(count)
    return chosen, weights


# ----- applying a pathway -----


def pathway_overrides(
    model: nn.Module, pathway: dict[int, Tensor], where: Tensor | None
) -> dict[int | str, RoutingOverride]:
    """Overrides that route the `where` tokens of each layer in `pathway` by its ω."""
    layers = {index: layer for index, _, layer in require_moe_layers(model, "C3PO")}
    out: dict[int | str, RoutingOverride] = {}
    for index, omega in pathway.items():
        layer = layers[index]
        if layer.config.router_kind != "token_choice":
            raise ConfigError(
                "layers",
                f"MoE layer {index} routes by {layer.config.router_kind!r}; C3PO needs top-k routers",
            )
        chosen, weights = pathway_routing(
            omega, layer.config.router, getattr(layer.router, "selection_bias", None)
        )
        out[index] = RoutingOverride(force=chosen, weights=weights, where=where)
    return out


def _reference_batch(references: Sequence[Reference]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded prompt+answer rows: ids, real mask, answer-target mask (positions whose next
    token is an answer token) and the last-prompt-token mask, each [N, S]."""
    length = max(len(r.prompt_ids) + len(r.answer_ids) for r in references)
    ids = torch.zeros(len(references), length, dtype=torch.long)
    real = torch.zeros(len(references), length, dtype=torch.bool)
    targets = torch.zeros_like(real)
    last = torch.zeros_like(real)
    for row, reference in enumerate(references):
        tokens = reference.prompt_ids + reference.answer_ids
        start = length - len(tokens)
        ids[row, start:] = torch.tensor(tokens)
        real[row, start:] = True
        prompt_end = start + len(reference.prompt_ids) - 1
        last[row, prompt_end] = True
        targets[row, prompt_end : length - 1] = True
    return ids, real, targets, last


def neighbourhood_loss(
    model: nn.Module,
    references: Sequence[Reference],
    kernel: Tensor,
    pathway: dict[int, Tensor],
    apply_to_new: bool = False,
) -> Tensor:
    """Σ K_i ℓ(f(x_i; ω), y_i) / Σ K (C3PO eq. 6): ℓ the mean cross-entropy of reference i's answer
    tokens, ω applied at its last prompt token (and its answer tokens with `apply_to_new`)."""
    ids, real, targets, last = _reference_batch(references)
    where = targets if apply_to_new else last
    with override_routing(model, pathway_overrides(model, pathway, where)):
        logits = full_logits(model, ids, real)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    keep = targets[:, :-1].float()
    per_row = (losses * keep).sum(-1) / keep.sum(-1).clamp_min(1)
    weights = kernel if float(kernel.sum()) > 0 else torch.ones_like(kernel)
    return (weights * per_row).sum() / weights.sum()


# ----- the method -----


@dataclass
class C3POResult:
    """The re-mixed pathway {critical layer: ω [E]}, the item's own, the neighbours chosen (indices
    into the reference set, with their kernel weights), the neighbours' loss at the own pathway
    and at the result, the α chosen (kernel regression) and the cost."""

    pathway: dict[int, Tensor]
    own: dict[int, Tensor]
    neighbours: list[int]
    kernel: Tensor
    loss_before: float
    loss_after: float
    alpha: float | None = None
    cost: MethodCost = field(default_factory=MethodCost)


def c3po(
    model: nn.Module,
    prompt_ids: Sequence[int],
    references: Sequence[Reference],
    *,
    variant: str = "ngd",
    layers: int | None = None,
    neighbours: int = 3,
    neighbour_mode: str = "nearest",
    kernel: str = "gaussian",
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    steps: int = 10,
    lr: float = 0.1,
    core_experts: int | None = None,
    apply_to_new: bool = False,
    seed: int = 0,
) -> C3POResult:
    """Re-mix the critical layers' pathway of one prompt (a list of token ids) from `references`
    (built with `make_reference`); generate with `c3po_generate`."""
    require_choice("variant", variant, VARIANTS)
    require_int("steps", steps, minimum=0)
    require_number("lr", lr, minimum=0.0, strict=True)
    if not alphas:
        raise ConfigError("alphas", "got an empty list, expected numbers in [0, 1]")
    for alpha in alphas:
        require_number("alphas", alpha, minimum=0.0)
        if alpha > 1:
            raise ConfigError("alphas", f"got {alpha}, expected numbers in [0, 1]")
    critical = critical_layers(model, layers)
    layer_of = {index: layer for index, _, layer in require_moe_layers(model, "C3PO")}
    cost = MethodCost()
    embedding, full_pathway = embed_and_route(model, prompt_ids)
    cost.forward_passes += 1
    own = {index: full_pathway[index] for index in critical}
    chosen, weights = choose_neighbours(
        embedding, references, neighbours, mode=neighbour_mode, kernel=kernel, seed=seed
    )
    group = [references[i] for i in chosen]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = float(neighbourhood_loss(model, group, weights, own, apply_to_new))
        cost.forward_passes += 1
        if variant == "kernel":
            target = {
                index: kernel_regression(weights, torch.stack([r.pathway[index] for r in group]))
                for index in critical
            }
            best: tuple[float, dict[int, Tensor], float] | None = None
            for alpha in alphas:
                candidate = {index: blend(own[index], target[index], alpha) for index in critical}
                if alpha == 1.0:
                    value = before  # the own pathway, already scored
                else:
                    with torch.no_grad():
                        value = float(neighbourhood_loss(model, group, weights, candidate, apply_to_new))
                    cost.forward_passes += 1
                if best is None or value < best[0]:
                    best = (value, candidate, alpha)
            assert best is not None
            return C3POResult(best[1], own, chosen, weights, before, best[0], best[2], cost)
        return _ngd(
            model, own, group, chosen, weights, before, layer_of, steps, lr, core_experts, apply_to_new, cost
        )
    finally:
        model.train(was_training)


def _ngd(model, own, group, chosen, weights, before, layer_of, steps, lr, core_experts, apply_to_new, cost):
    thetas, cores, normalise = {}, {}, {}
    for index, omega in own.items():
        spec = layer_of[index].config.router
        count = default_core_experts(spec) if core_experts is None else core_experts
        require_int("core_experts", count, minimum=1)
        if count > spec.num_experts:
            raise ConfigError("core_experts", f"got {count}, the layer has {spec.num_experts} experts")
        cores[index] = torch.zeros_like(omega, dtype=torch.bool).scatter_(0, omega.topk(count).indices, True)
        thetas[index] = torch.zeros_like(omega, requires_grad=True)
        normalise[index] = spec.score_fn == "softmax"
    optimiser = torch.optim.Adam(list(thetas.values()), lr=lr)
    best = (before, own)
    for step in range(steps):
        pathway = {i: core_scaled(own[i], thetas[i], cores[i], normalise[i]) for i in own}
        with torch.enable_grad():
            loss = neighbourhood_loss(model, group, weights, pathway, apply_to_new)
            optimiser.zero_grad()
            loss.backward()
        cost.forward_passes += 1
        cost.backward_passes += 1
        if step > 0 and float(loss.detach()) < best[0]:
            best = (float(loss.detach()), {i: p.detach() for i, p in pathway.items()})
        optimiser.step()
    if steps > 0:
        with torch.no_grad():
            final = {i: core_scaled(own[i], thetas[i], cores[i], normalise[i]) for i in own}
            value = float(neighbourhood_loss(model, group, weights, final, apply_to_new))
        cost.forward_passes += 1
        if value < best[0]:
            best = (value, final)
    return C3POResult(best[1], own, chosen, weights, before, best[0], None, cost)


@torch.no_grad()
def c3po_generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    pathway: dict[int, Tensor],
    *,
    max_new_tokens: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    apply_to_new: bool = False,
    capture: RoutingCapture | None = None,
) -> tuple[Tensor, MethodCost]:
    """Greedy decoding with `pathway` routing the last prompt token (and, with `apply_to_new`,
    every generated token): the prompt followed by the new tokens [1, S + new], and the cost."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    real = _check_inputs(model, ids, None, max_new_tokens)
    kind = _model_kind(model)
    eos = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    last = torch.zeros_like(real)
    last[:, -1] = True
    prefill = Overrides(pathway_overrides(model, pathway, last), capture=capture)
    step = Overrides(pathway_overrides(model, pathway, None) if apply_to_new else {}, capture=capture)
    cost = MethodCost()
    was_training = model.training
    model.eval()
    cache = model.new_cache()
    tokens: list[Tensor] = []
    try:
        step_ids, step_real, positions = ids, real, positions_of(real)
        for number in range(max_new_tokens):
            with override_routing(model, prefill if number == 0 else step):
                logits = _forward(model, kind, step_ids, step_real, positions, cache)
            cost.forward_passes += 1
            token = logits.argmax(-1)
            tokens.append(token)
            if int(token) in eos:
                break
            step_ids = token[:, None]
            step_real = torch.ones_like(step_ids, dtype=torch.bool)
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    new = torch.stack(tokens, dim=1) if tokens else ids[:, :0]
    return torch.cat([ids, new], dim=1), cost
