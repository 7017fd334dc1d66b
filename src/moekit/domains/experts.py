"""Opt-out and opt-in: remove or add one expert (one domain's data) of a mixed model without
retraining (FlexOlmo §3.4: "opt-out = delete expert j's FFN and router row").

Removing expert j slices j out of every per-expert tensor (expert weights, router row and bias)
and keeps every other tensor bit-identical; with a softmax router renormalised over its top-k this
computes exactly what the full model computes with expert j masked from routing. Attention experts
(BAM) go with their domain: removing expert j also removes attention expert j and its router row.
Adding an expert appends its FFN, router row and bias (and, with attention experts, its attention
and attention router row) as the last expert.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError
from moekit.models.lm import LanguageModel

PER_EXPERT = ("experts.w_in", "experts.w_out", "router.weight", "router.bias")


def _per_expert(name: str) -> bool:
    return ".ffn." in name and name.split(".ffn.", 1)[1] in PER_EXPERT


ATTENTION_EXPERT = re.compile(r"^(.*\.attn\.experts\.)(\d+)(\..*)$")


def _source_tensor(source: dict[str, Tensor], name: str, keep: list[int]) -> Tensor:
    """The tensor of the model without the removed expert, from the full model's `source`."""
    match = ATTENTION_EXPERT.match(name)
    if match:  # attention expert e of the smaller model is expert keep[e] of the full one
        return source[f"{match[1]}{keep[int(match[2])]}{match[3]}"]
    if _per_expert(name) or ".attn.router." in name:
        return source[name][keep]
    return source[name]


def _with_experts(config, num_experts: int, top_k: int | None = None):
    spec = config.moe.router
    k = min(spec.top_k if top_k is None else top_k, num_experts)
    moe = dataclasses.replace(config.moe, router=spec.with_(num_experts=num_experts, top_k=k))
    attention = config.attention_experts
    if attention is not None:
        attention = dataclasses.replace(
            attention, num_experts=num_experts, top_k=min(attention.top_k, num_experts)
        )
    return dataclasses.replace(config, moe=moe, attention_experts=attention)


def _check_editable(model: LanguageModel) -> None:
    moe = model.config.moe
    if moe is None:
        raise MoekitError("the model is dense; opt-out/opt-in edit an MoE's experts")
    if moe.router_kind != "token_choice" or moe.experts_kind != "packed" or moe.num_shared_experts:
        raise MoekitError(
            "opt-out/opt-in handle token-choice routers over packed experts without shared experts"
        )
    extra = [n for n in model.state_dict() if ".ffn." in n and not _per_expert(n)]
    if extra:
        raise MoekitError(f"{extra[0]}: a per-layer MoE tensor opt-out does not know how to edit")
    attention = model.config.attention_experts
    if attention is not None and attention.num_experts != moe.router.num_experts:
        raise MoekitError(
            f"model.attention_experts.num_experts is {attention.num_experts}, the MoE has "
            f"{moe.router.num_experts} experts; opt-out removes one domain's FFN and attention together"
        )


@torch.no_grad()
def remove_expert(model: LanguageModel, expert: int) -> LanguageModel:
    """The model without expert `expert` in every MoE layer (top-k capped at the experts left)."""
    _check_editable(model)
    count = model.config.moe.router.num_experts
    if not 0 <= expert < count:
        raise ConfigError("expert", f"got {expert}, expected an expert index in [0, {count})")
    if count == 1:
        raise ConfigError("expert", "the model has one expert; removing it leaves no FFN")
    if expert == 0 and model.config.moe.router.negative_bias:
        raise ConfigError(
            "expert", "expert 0 is FlexOlmo's public expert (the unbiased one); only domain experts opt out"
        )
    keep = [e for e in range(count) if e != expert]
    out = LanguageModel(_with_experts(model.config, count - 1)).to(model.embed.weight.dtype).eval()
    source = model.state_dict()
    for name, tensor in out.state_dict().items():
        tensor.copy_(_source_tensor(source, name, keep))
    return out


@torch.no_grad()
def add_expert(
    model: LanguageModel,
    proj_in: Sequence[Tensor],
    proj_out: Sequence[Tensor],
    router_rows: Sequence[Tensor],
    bias: float | Sequence[float] = 0.0,
    attention: Sequence[Mapping[str, Tensor]] | None = None,
    attention_router_rows: Sequence[Tensor] | None = None,
) -> LanguageModel:
    """The model with one more expert, last: per layer its dense FFN weights (`proj_in` [2F, H],
    `proj_out` [H, F], as in a dense moekit block) and router row [H]; `bias` is its router bias
    (models whose router has one; one number, or one per layer). A model with attention experts
    (BAM) takes, per layer, the new expert's attention (`attention`: a dense attention layer's
    state dict; with shared K/V only its Q and O are used) and its attention router row."""
    _check_editable(model)
    layers = len(model.blocks)
    given = [("proj_in", proj_in), ("proj_out", proj_out), ("router_rows", router_rows)]
    if model.config.attention_experts is not None:
        if attention is None or attention_router_rows is None:
            raise ConfigError(
                "attention", "the model has attention experts (BAM): give the added expert's attention too"
            )
        given += [("attention", attention), ("attention_router_rows", attention_router_rows)]
    for what, items in given:
        if len(items) != layers:
            raise ConfigError(what, f"got {len(items)} tensors, expected one per layer ({layers})")
    count = model.config.moe.router.num_experts
    out = LanguageModel(_with_experts(model.config, count + 1)).to(model.embed.weight.dtype).eval()
    source = model.state_dict()
    for name, tensor in out.state_dict().items():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        match = ATTENTION_EXPERT.match(name)
        if match and int(match[2]) < count:
            tensor.copy_(source[name])
            continue
        if match:  # the new attention expert: named as the dense layer's tensors
            part = match[3][1:]
            new = attention[layer].get(part)
            if new is None:
                raise ConfigError("attention", f"layer {layer}: no {part} in the added expert's attention")
            _check_shape(part, layer, new, tensor.shape)
            tensor.copy_(new)
            continue
        if ".attn.router." in name:
            new = attention_router_rows[layer]
            _check_shape("attention_router_rows", layer, new, tensor.shape[1:])
            tensor.copy_(torch.cat([source[name], new.unsqueeze(0).to(tensor.dtype)]))
            continue
        if not _per_expert(name):
            tensor.copy_(source[name])
            continue
        part = name.split(".ffn.", 1)[1]
        new = {
            "experts.w_in": proj_in[layer],
            "experts.w_out": proj_out[layer],
            "router.weight": router_rows[layer],
            "router.bias": torch.tensor(
                float(bias if isinstance(bias, int | float) else bias[layer]), dtype=torch.float64
            ),
        }[part]
        _check_shape(part, layer, new, tensor.shape[1:])
        tensor.copy_(torch.cat([source[name], new.unsqueeze(0).to(tensor.dtype)]))
    return out


def _check_shape(part: str, layer: int, new: Tensor, expected) -> None:
    if tuple(new.shape) != tuple(expected):
        raise ConfigError(part, f"layer {layer}: got shape {tuple(new.shape)}, expected {tuple(expected)}")


def edit_experts(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    remove: str | None = None,
    add: str | os.PathLike | None = None,
    domain: str | None = None,
    bias: float | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Opt a domain out of (`remove`: its name) or into (`add`: a branch run, named `domain`) the
    mixed model at `src`, writing the edited model to `dst`. An added expert's router row is the
    mixed model's mean FFN input on the domain's training text with the public expert forced
    (the seed's own hidden states when branches trained only FFNs), as FlexOlmo's rows are; with
    attention experts, its attention router row is the mean attention input, likewise."""
    from moekit.domains.mix import PUBLIC, expert_domains_of, mixed_state, save_mixed

    if (remove is None) == (add is None):
        raise ConfigError("remove/add", "give exactly one: a domain to remove or a branch run to add")
    model, state, domains = expert_domains_of(src)
    if remove is not None:
        if remove not in domains:
            raise ConfigError("remove", f"got {remove!r}, expected one of the experts: {', '.join(domains)}")
        edited = remove_expert(model, domains.index(remove))
        new_domains = [d for d in domains if d != remove]
        what = {"removed": remove}
    else:
        edited, new_domains, what = _opt_in(model, state, domains, Path(add), domain, bias, PUBLIC)
    receipt = {"format": "moekit-mix-edit", "version": 1, "source": str(Path(src).resolve()), **what,
               "expert_domains": new_domains}  # fmt: skip
    new_state = mixed_state(state, edited, new_domains, str(Path(src).resolve()))
    save_mixed(Path(dst), edited, new_state, receipt, overwrite=overwrite)
    log(f"{src} -> {dst}: experts {', '.join(new_domains)}")
    return receipt


def _attention_override(model: LanguageModel, force):
    """`force` on the attention experts too (a no-op context for models without them)."""
    from contextlib import nullcontext

    from moekit.models.attention_experts import override_attention_routing

    if model.config.attention_experts is None or force is None:
        return nullcontext()
    return override_attention_routing(model, force)


def _opt_in_owner(model, domains, owner, run: Path, domain):
    """FlexOlmo's opt-in of a coordinated owner model (`domains.coordinated`): its expert, trained
    router row and bias join as they are; the owner must share the public expert and every
    non-FFN tensor with the mixed model."""
    from moekit.domains.coordinated import merge_owners

    if not model.config.moe.router.negative_bias:
        raise MoekitError(f"{run}: a FlexOlmo owner model joins only a FlexOlmo mix (router flexolmo)")
    # the mixed model's public expert and shared tensors, as a 2-expert owner, must match the owner
    try:
        merge_owners([_public_owner(model), owner], ["mixed model", str(run)], top_k=1)
    except MoekitError as exc:
        raise MoekitError(f"{run}: not coordinated with the mixed model ({exc})") from None
    edited = add_expert(
        model,
        [b.ffn.experts.w_in[1] for b in owner.blocks],
        [b.ffn.experts.w_out[1] for b in owner.blocks],
        [b.ffn.router.weight[1] for b in owner.blocks],
        [float(b.ffn.router.bias[1]) for b in owner.blocks],
    )
    return edited, [*domains, domain], {"added": domain, "from": str(run.resolve()), "owner": True}


def _public_owner(model: LanguageModel) -> LanguageModel:
    """The mixed model cut to its public expert and first domain expert (a 2-expert model)."""
    out = model
    while out.config.moe.router.num_experts > 2:
        out = remove_expert(out, out.config.moe.router.num_experts - 1)
    return out


def _opt_in(model, state, domains, run: Path, domain, bias, public_name):
    from moekit.construct.lm import load_run_model
    from moekit.domains.data import calibration_ids, load_data
    from moekit.routing.override import RoutingOverride, override_routing

    if not domain:
        raise ConfigError("domain", "name the domain of the added expert")
    if domain in domains:
        raise ConfigError("domain", f"{domain!r} is already an expert of this model")
    branch, _ = load_run_model(run)
    if branch.config.moe is not None and branch.config.moe.router.negative_bias:
        return _opt_in_owner(model, domains, branch, run, domain)
    if branch.config.moe is not None or branch.config.hidden_size != model.config.hidden_size:
        raise MoekitError(f"{run}: expected a dense branch of the mixed model's architecture")
    data_cfg = state.get("config", {}).get("data", {})
    data = load_data(data_cfg.get("source", "builtin"), data_cfg.get("tokenizer", "byte"), log=lambda _: None)
    ids = calibration_ids(data, domain, seq_len=min(64, model.config.max_seq_len))
    captured: dict[tuple[str, int], list[Tensor]] = {}

    def keep(key):
        return lambda _m, _a, out: captured.setdefault(key, []).append(
            out.reshape(-1, out.shape[-1]).double()
        )

    # the FFN's input is the output of the block's ffn_norm, the attention's of its attn_norm
    hooks = [b.ffn_norm.register_forward_hook(keep(("ffn", i))) for i, b in enumerate(model.blocks)]
    with_attention = model.config.attention_experts is not None
    if with_attention:
        hooks += [b.attn_norm.register_forward_hook(keep(("attn", i))) for i, b in enumerate(model.blocks)]
    anchor = [domains.index(public_name)] if public_name in domains else None
    force = RoutingOverride(force=anchor, top_k=1) if anchor else None
    try:
        with torch.no_grad(), override_routing(model, force), _attention_override(model, force):
            for x in ids:
                model(x)
    finally:
        for h in hooks:
            h.remove()

    def rows_of(kind: str) -> list[Tensor]:
        return [
            torch.nn.functional.normalize(torch.cat(captured[(kind, i)]).mean(0), dim=0)
            for i in range(len(model.blocks))
        ]

    rows = rows_of("ffn")
    if not model.config.moe.router.router_bias:
        bias = 0.0
    elif bias is None:
        existing = model.blocks[0].ffn.router.bias.detach()
        bias = float(existing[-1]) if len(existing) else 0.0
    edited = add_expert(
        model,
        [b.ffn.proj_in.weight for b in branch.blocks],
        [b.ffn.proj_out.weight for b in branch.blocks],
        rows,
        bias,
        attention=[b.attn.state_dict() for b in branch.blocks] if with_attention else None,
        attention_router_rows=rows_of("attn") if with_attention else None,
    )
    return edited, [*domains, domain], {"added": domain, "from": str(run.resolve()), "bias": bias}
