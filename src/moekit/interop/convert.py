"""State-dict mapping between a family's HF checkpoint and moekit's `FamilyModel`, both ways.

Every moekit tensor comes from one `Rule`: the HF tensors it is made of and the two pure tensor
rearrangements (join: HF -> moekit, split: moekit -> HF). Rearrangements are permutations,
reshapes and concatenations only, so a round trip gives back every tensor bit for bit, and a
checkpoint whose keys or shapes do not match the rules is refused with the keys named (the failure
mode of layout conversions that silently drop or mis-merge experts, moe-systems.md P15).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.interop.attention import build_attention
from moekit.interop.families import ExpertNames, FamilySpec, MoENames
from moekit.interop.model import FamilyConfig

Join = Callable[[list[Tensor]], Tensor]
Split = Callable[[Tensor], list[Tensor]]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    join: Join
    split: Split


def _same(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda ts: ts[0], lambda t: [t])


def _concat(ours: str, theirs: tuple[str, ...]) -> Rule:
    """Row blocks of equal size, e.g. [gate | up] from gate_proj and up_proj."""
    n = len(theirs)
    return Rule(ours, theirs, lambda ts: torch.cat(ts, 0), lambda t: [c.contiguous() for c in t.chunk(n, 0)])


def _stacked_gate_up(ours: str, gates: tuple[str, ...], ups: tuple[str, ...]) -> Rule:
    """[E, 2I, H] from E per-expert [I, H] gate and up matrices."""
    e = len(gates)

    def join(ts: list[Tensor]) -> Tensor:
        return torch.cat([torch.stack(ts[:e]), torch.stack(ts[e:])], dim=1)

    def split(t: Tensor) -> list[Tensor]:
        gate, up = t.chunk(2, dim=1)
        return [g.contiguous() for g in gate.unbind(0)] + [u.contiguous() for u in up.unbind(0)]

    return Rule(ours, gates + ups, join, split)


def _transposed(ours: str, theirs: str) -> Rule:
    """[E, in, out] stored as x @ W (Llama 4) <-> moekit's nn.Linear-style [E, out, in]."""
    return Rule(
        ours,
        (theirs,),
        lambda ts: ts[0].transpose(1, 2).contiguous(),
        lambda t: [t.transpose(1, 2).contiguous()],
    )


def _stacked(ours: str, theirs: tuple[str, ...]) -> Rule:
    return Rule(ours, theirs, lambda ts: torch.stack(ts), lambda t: [x.contiguous() for x in t.unbind(0)])


def _interleaved_columns(t: Tensor) -> Tensor:
    """[..., 2I] with gate/up interleaved -> [..., 2I] as [gate | up] (GPT-OSS)."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave_columns(t: Tensor) -> Tensor:
    gate, up = t.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).reshape(t.shape)


def _gpt_oss_rules(prefix: str, ours: str, names: tuple[str, ...]) -> list[Rule]:
    gate_up, down, gate_up_bias, down_bias = (prefix + n for n in names)
    return [
        Rule(
            f"{ours}w_in",
            (gate_up,),
            lambda ts: _interleaved_columns(ts[0]).transpose(1, 2).contiguous(),
            lambda t: [_interleave_columns(t.transpose(1, 2)).contiguous()],
        ),
        Rule(
            f"{ours}w_out",
            (down,),
            lambda ts: ts[0].transpose(1, 2).contiguous(),
            lambda t: [t.transpose(1, 2).contiguous()],
        ),
        Rule(
            f"{ours}b_in",
            (gate_up_bias,),
            lambda ts: _interleaved_columns(ts[0]).contiguous(),
            lambda t: [_interleave_columns(t).contiguous()],
        ),
        _same(f"{ours}b_out", down_bias),
    ]


def _dbrx_rules(prefix: str, ours: str, names: tuple[str, ...], experts: int, ff: int) -> list[Rule]:
    """DBRX keeps w1 (gate), v1 (up) and w2 (down, transposed) as flat [E * I, H] matrices."""
    w1, v1, w2 = (prefix + n for n in names)

    def join_in(ts: list[Tensor]) -> Tensor:
        gate, up = (t.view(experts, ff, -1) for t in ts)
        return torch.cat([gate, up], dim=1)

    def split_in(t: Tensor) -> list[Tensor]:
        gate, up = t.chunk(2, dim=1)
        return [gate.reshape(experts * ff, -1).contiguous(), up.reshape(experts * ff, -1).contiguous()]

    return [
        Rule(f"{ours}w_in", (w1, v1), join_in, split_in),
        Rule(
            f"{ours}w_out",
            (w2,),
            lambda ts: ts[0].view(experts, ff, -1).transpose(1, 2).contiguous(),
            lambda t: [t.transpose(1, 2).reshape(experts * ff, -1).contiguous()],
        ),
    ]


def _expert_rules(prefix: str, ours: str, experts: ExpertNames, fc: FamilyConfig) -> list[Rule]:
    num = fc.moe.router.num_experts
    if experts.format == "fused":
        gate_up, down = experts.names
        return [_same(f"{ours}w_in", prefix + gate_up), _same(f"{ours}w_out", prefix + down)]
    if experts.format == "per_expert":
        gate, up, down = (tuple(prefix + n.format(e=e) for e in range(num)) for n in experts.names)
        return [_stacked_gate_up(f"{ours}w_in", gate, up), _stacked(f"{ours}w_out", down)]
    if experts.format == "transposed":
        gate_up, down = (prefix + n for n in experts.names)
        return [_transposed(f"{ours}w_in", gate_up), _transposed(f"{ours}w_out", down)]
    if experts.format == "gpt_oss":
        return _gpt_oss_rules(prefix, ours, experts.names)
    return _dbrx_rules(prefix, ours, experts.names, num, fc.moe.ff_size)


def _moe_rules(layer: str, i: int, names: MoENames, fc: FamilyConfig) -> list[Rule]:
    p = layer + names.prefix
    ours = f"layers.{i}.ffn."
    rules = [_same(f"{ours}router.weight", f"{p}{names.router}weight")]
    if fc.moe.router.router_bias:
        rules.append(_same(f"{ours}router.bias", f"{p}{names.router}bias"))
    if fc.moe.router.selection_bias:
        if names.selection_bias is None:
            raise MoekitError(f"{fc.family}: this family has no selection bias to map")
        rules.append(_same(f"{ours}router.selection_bias", p + names.selection_bias))
    rules += _expert_rules(p, f"{ours}experts.", names.experts, fc)
    if fc.moe.num_shared_experts:
        s = p + (names.shared or "")
        rules.append(_concat(f"{ours}shared.proj_in.weight", (f"{s}gate_proj.weight", f"{s}up_proj.weight")))
        rules.append(_same(f"{ours}shared.proj_out.weight", f"{s}down_proj.weight"))
        if fc.moe.shared_gate:
            rules.append(_same(f"{ours}shared.gate.weight", p + (names.shared_gate or "")))
    return rules


def _attention_names(fc: FamilyConfig) -> list[str]:
    """Parameter names of one layer's attention module, read off the module itself."""
    with torch.device("meta"):
        module = build_attention(fc.hidden_size, fc.attention, fc.rope.layout)
    return [name for name, _ in module.named_parameters()]


def rules_for(spec: FamilySpec, fc: FamilyConfig, layout: str) -> list[Rule]:
    """Every tensor of `fc`'s model, in state-dict order, as a rule over the `layout` checkpoint."""
    n = spec.names
    rules = [_same("embed.weight", n.embed)]
    attention = _attention_names(fc)
    for i in range(fc.num_layers):
        layer = n.layer.format(i=i)
        rules.append(_same(f"layers.{i}.attn_norm.weight", layer + n.attn_norm))
        for name in attention:
            rules.append(_same(f"layers.{i}.attn.{name}", layer + n.attn + n.attn_renames.get(name, name)))
        rules.append(_same(f"layers.{i}.ffn_norm.weight", layer + n.ffn_norm))
        if fc.moe_layers[i]:
            rules += _moe_rules(layer, i, n.moe[layout], fc)
        else:
            d = layer + n.dense
            rules.append(
                _concat(f"layers.{i}.ffn.proj_in.weight", (f"{d}gate_proj.weight", f"{d}up_proj.weight"))
            )
            rules.append(_same(f"layers.{i}.ffn.proj_out.weight", f"{d}down_proj.weight"))
    rules.append(_same("norm.weight", n.norm))
    if not fc.tie_embeddings:
        rules.append(_same("head.weight", n.head))
    return rules


def detect_layout(spec: FamilySpec, fc: FamilyConfig, keys: Iterable[str], source: str) -> str:
    """Which expert layout a checkpoint uses, judged by its first MoE layer."""
    keys = set(keys)
    first = next((i for i, moe in enumerate(fc.moe_layers) if moe), None)
    if first is None:
        return "per_expert"
    layer = spec.names.layer.format(i=first)
    tried = []
    for layout in ("per_expert", "packed"):
        wanted = [k for rule in _moe_rules(layer, first, spec.names.moe[layout], fc) for k in rule.theirs]
        if all(k in keys for k in wanted):
            return layout
        tried.append(next(k for k in wanted if k not in keys))
    raise MoekitError(
        f"{source}: no experts found for layer {first} of this {spec.name} checkpoint "
        f"(looked for {tried[0]!r} and {tried[1]!r})"
    )


def _ignored(spec: FamilySpec, fc: FamilyConfig) -> list[re.Pattern[str]]:
    patterns = [p.format(num_layers=fc.num_layers) for p in spec.names.ignored]
    if fc.tie_embeddings:
        patterns.append("^" + re.escape(spec.names.head) + "$")
    return [re.compile(p) for p in patterns]


def hf_to_moekit(
    spec: FamilySpec, fc: FamilyConfig, layout: str, tensors: Mapping[str, Tensor], source: str
) -> dict[str, Tensor]:
    """moekit's state dict from an HF checkpoint's tensors; every tensor must be accounted for."""
    rules = rules_for(spec, fc, layout)
    missing = [k for rule in rules for k in rule.theirs if k not in tensors]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise MoekitError(f"{source}: missing tensors for a {spec.name} model ({layout} layout): {shown}")
    used = {k for rule in rules for k in rule.theirs}
    ignored = _ignored(spec, fc)
    unexpected = sorted(k for k in tensors if k not in used and not any(p.search(k) for p in ignored))
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (
            f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        )
        raise MoekitError(f"{source}: tensors a {spec.name} model does not have: {shown}")
    state = {}
    for rule in rules:
        try:
            state[rule.ours] = rule.join([tensors[k] for k in rule.theirs])
        except RuntimeError as exc:
            shapes = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in rule.theirs[:2])
            raise MoekitError(f"{source}: cannot assemble {rule.ours} from {shapes}: {exc}") from None
    return state


def moekit_to_hf(
    spec: FamilySpec, fc: FamilyConfig, layout: str, state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The HF checkpoint tensors (`layout`) of a moekit state dict."""
    out: dict[str, Tensor] = {}
    for rule in rules_for(spec, fc, layout):
        if rule.ours not in state:
            raise MoekitError(f"model state has no {rule.ours!r}; is it a {spec.name} family model?")
        parts = rule.split(state[rule.ours].detach())
        out.update(zip(rule.theirs, parts, strict=True))
    return out
