"""FlexOlmo's coordinated training (Shi et al. 2025, "FlexOlmo: Open Language Models for Flexible
Data Use", §3.2; allenai/FlexOlmo `src/scripts/upcycle/{dense_to_expert_moe.py,
merge_experts_to_flexolmo.py}`).

Each data owner j trains, on its own data only, a 2-expert MoE: expert 0 is the public model's FFN
with its router row r_pub, both frozen; expert 1 starts as a copy of the public FFN, with the router
row r_j (the domain embedding) and FlexOlmo's negative-only bias, and trains together with its row
and bias. Attention, embeddings, norms and head stay the public model's. Because every owner
shares the frozen public expert, its router row and everything outside the FFNs, the owners' experts
merge by concatenation, W_r = [r_pub; r_1; ...; r_n], with no joint training: the merged model
with every owner but j opted out computes owner j's model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.models.lm import LanguageModel

PUBLIC_EXPERT = 0


@torch.no_grad()
def owner_model(public: LanguageModel, rows: Sequence[Tensor], *, top_k: int, bias: float) -> LanguageModel:
    """Owner j's 2-expert MoE before training: the public model with its FFN as expert 0 and as
    expert 1, router rows `rows[i]` [2, H] = [r_pub; r_j] per layer, bias [0, b]."""
    from moekit.domains.mix import MixOptions, mix_lm

    options = MixOptions(router="flexolmo", top_k=min(top_k, 2), bias=bias)
    moe, _ = mix_lm([public], options, public=public, router_rows=rows, names=["owner"])
    return moe


def public_expert_tensors(model: LanguageModel) -> list[tuple[Tensor, int]]:
    """(parameter, index) of every slice owner training keeps frozen in its FFNs: expert 0's
    weights, the public router row and its (unused) bias entry."""
    out = []
    for block in model.blocks:
        ffn = block.ffn
        out += [(ffn.experts.w_in, PUBLIC_EXPERT), (ffn.experts.w_out, PUBLIC_EXPERT)]
        out.append((ffn.router.weight, PUBLIC_EXPERT))
        if ffn.router.bias is not None:
            out.append((ffn.router.bias, PUBLIC_EXPERT))
    return out


def freeze_for_owner_training(model: LanguageModel, optimizer: torch.optim.Optimizer) -> None:
    """Train only the owner's expert, router row and bias: every non-FFN parameter stops taking
    gradients, the public slices get zero gradients, and after every optimizer step they are
    restored bit for bit (AdamW's weight decay would otherwise move them)."""
    from moekit.domains.branch import freeze_all_but_ffn

    freeze_all_but_ffn(model)
    frozen = [(p, i, p.detach()[i].clone()) for p, i in public_expert_tensors(model)]

    def zero_public(index: int):
        def hook(grad: Tensor) -> Tensor:
            grad = grad.clone()
            grad[index] = 0
            return grad

        return hook

    for p, i, _ in frozen:
        p.register_hook(zero_public(i))

    def restore(*_args, **_kwargs) -> None:
        with torch.no_grad():
            for p, i, value in frozen:
                p[i].copy_(value)

    optimizer.register_step_post_hook(restore)


def check_coordinated(owners: Sequence[LanguageModel], names: Sequence[str]) -> None:
    """The owners must share the public expert, its router row and every non-FFN tensor bit for bit
    (coordinated training); anything else is refused naming the tensor and the owner."""
    from moekit.domains.mix import is_expert_tensor

    ref = owners[0].state_dict()
    for owner, name in zip(owners, names, strict=True):
        if owner.config.moe is None or owner.config.moe.router.num_experts != 2:
            raise MoekitError(f"{name}: not a FlexOlmo owner model (expected a 2-expert MoE)")
        state = owner.state_dict()
        for key, tensor in ref.items():
            if not is_expert_tensor(key) and not torch.equal(tensor, state[key]):
                raise MoekitError(
                    f"{name}: {key} differs from {names[0]}'s; owners must share it (coordinated)"
                )
        for p, i in public_expert_tensors(owner):
            key = next(k for k, v in owner.named_parameters() if v is p)
            if not torch.equal(p[i], ref[key][i]):
                raise MoekitError(f"{name}: the public expert's {key}[{i}] differs from {names[0]}'s")


@torch.no_grad()
def merge_owners(
    owners: Sequence[LanguageModel], names: Sequence[str], *, top_k: int
) -> tuple[LanguageModel, dict[str, str]]:
    """FlexOlmo's merge: expert 0 = the public expert (once), expert j = owner j's expert, router
    rows [r_pub; r_1; ...; r_n] and bias [0, b_1, ..., b_n]; every other tensor the owners' shared
    one."""
    from moekit.domains.experts import _with_experts

    check_coordinated(owners, names)
    first = owners[0]
    config = _with_experts(first.config, 1 + len(owners), top_k=top_k)
    moe = LanguageModel(config).to(first.embed.weight.dtype).eval()
    moe.load_state_dict({k: v for k, v in first.state_dict().items() if ".ffn." not in k}, strict=False)
    provenance = {"non-FFN tensors": f"shared by every owner (copied from {names[0]})"}
    for i, block in enumerate(moe.blocks):
        ffn = block.ffn
        sources = [first.blocks[i].ffn] + [o.blocks[i].ffn for o in owners]
        slots = [PUBLIC_EXPERT] + [1] * len(owners)
        for e, (source, slot) in enumerate(zip(sources, slots, strict=True)):
            ffn.experts.w_in[e].copy_(source.experts.w_in[slot])
            ffn.experts.w_out[e].copy_(source.experts.w_out[slot])
            ffn.router.weight[e].copy_(source.router.weight[slot])
            ffn.router.bias[e].copy_(source.router.bias[slot] if e else 0.0)
        provenance[f"blocks.{i}.ffn.*"] = "expert 0 = public; expert j = expert 1 of " + ", ".join(names)
    return moe, provenance


@torch.no_grad()
def owner_checks(
    moe: LanguageModel, owners: Sequence[tuple[str, LanguageModel]], batches: Sequence[Tensor], text: str
) -> dict:
    """Step-0 check per owner: the merged model with every other owner opted out (masked) against
    owner j's own model; exact by construction."""
    from moekit.construct.receipt import check_entry, step_zero
    from moekit.routing.override import RoutingOverride, override_routing

    checks = {}
    count = len(owners)
    for j, (name, owner) in enumerate(owners):
        others = [1 + o for o in range(count) if o != j]

        def merged(ids, others=others):
            if not others:
                return moe(ids).logits
            with override_routing(moe, RoutingOverride(mask=others)):
                return moe(ids).logits

        result = step_zero(lambda ids, owner=owner: owner(ids).logits, merged, batches)
        checks[f"owner_{j + 1}_{name}"] = check_entry(result, True, moe.embed.weight.dtype, text)
    return checks
