"""Mix: N dense domain branches into one moekit MoE LM (Branch-Train-MiX, Sukhbaatar et al. 2024,
§2.2; FlexOlmo, Shi et al. 2025, §3).

Every layer's FFN becomes an MoE whose expert e is branch e's FFN, unchanged; every other tensor
(attention, norms, embeddings, head) is the element-wise mean over the branches (BTX eq. 3); a
tensor the branches all share unchanged is copied, not re-summed, so it stays bit-identical. With
`public`, the seed's FFN is expert 0 (FlexOlmo's public expert). Routers start as

- `random`: N(0, std) rows (BTX's default);
- `hidden`: mergekit's hidden-state rows (`construct.router_init.hidden_router`): each domain's
  mean FFN input minus the other domains', computed on the branches' uniform average;
- `flexolmo`: domain-embedding rows with FlexOlmo's negative-only learnable bias on the domain
  experts (`domains.flexolmo`; b starts at `bias` and trains with the router); implies `public`.
  Branches of `parts: flexolmo` (FlexOlmo's 2-expert owner models) are merged by concatenation
  instead (`domains.coordinated`): each owner's trained router row and bias are kept.

BAM (Zhang et al. 2024, #31) options make attention experts too: `attention: experts` turns each
branch's whole attention (Q, K, V, O) into attention expert e; `attention: shared_kv` gives each
expert its branch's Q and O over the branches' averaged K and V (one KV cache). The attention
router is always randomly initialised, as BAM's are, and routes softly by default
(`attention_top_k: 0`: every attention expert, weighted by its router probability, BAM's choice;
k > 0: top-k renormalised). `parallel: true` builds BAM's parallel block,
x + Attn(norm(x)) + FFN(norm'(x)); branches with sequential blocks then compute another function
than the mix, and the step-0 check reports the distance rather than holding it to a tolerance.
Models with attention experts or parallel blocks have no HF family.

The receipt (`mix_receipt.json`) holds, for every expert, the step-0 check: the mixed model with
that expert forced (top-1) on every layer against the model it came from (its branch, or the seed
for the public expert), on held-out text. Where every non-FFN tensor of the mix equals the
source's bit for bit (branches trained with `parts: ffn`), the two compute the same function and
the check is held to a tolerance; otherwise the distance is reported as measured.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError, require_choice, require_int, require_number
from moekit.models.lm import LanguageModel, LMConfig

ROUTERS = ("random", "hidden", "flexolmo")
ATTENTION = ("average", "experts", "shared_kv")
RECEIPT_FILE = "mix_receipt.json"
PUBLIC = "public"


@dataclass(frozen=True)
class MixOptions:
    router: str = "random"
    top_k: int = 2
    public: bool = False
    bias: float = -0.5  # flexolmo: b in z[:, 1:] += min(b, 0)
    router_std: float = 0.02
    seed: int = 0
    calibration_documents: int = 8
    attention: str = "average"  # BAM: "experts" (full attention experts) or "shared_kv"
    attention_top_k: int = 0  # 0: soft routing over every attention expert (BAM)
    parallel: bool = False  # BAM's parallel attention + FFN block

    def __post_init__(self) -> None:
        require_choice("mix.router", self.router, ROUTERS)
        require_choice("mix.attention", self.attention, ATTENTION)
        require_int("mix.attention_top_k", self.attention_top_k, minimum=0)
        if self.attention_top_k and self.attention == "average":
            raise ConfigError(
                "mix.attention_top_k", "routes attention experts; set mix.attention to experts or shared_kv"
            )
        if not isinstance(self.parallel, bool):
            raise ConfigError("mix.parallel", f"got {self.parallel!r}, expected true or false")
        require_int("mix.top_k", self.top_k, minimum=1)
        if not isinstance(self.public, bool):
            raise ConfigError("mix.public", f"got {self.public!r}, expected true or false")
        require_number("mix.bias", self.bias)
        if self.bias > 0:
            raise ConfigError(
                "mix.bias", f"got {self.bias}, expected a number <= 0 (FlexOlmo's bias is negative)"
            )
        require_number("mix.router_std", self.router_std, minimum=0.0)
        require_int("mix.seed", self.seed)
        require_int("mix.calibration_documents", self.calibration_documents, minimum=1)

    @property
    def with_public(self) -> bool:
        return self.public or self.router == "flexolmo"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_experts(self, num_experts: int, sources: str) -> None:
        """`top_k` and `attention_top_k` fit a mix of `num_experts` experts made of `sources`
        (e.g. "the public one and 2 branches"); a larger k is refused, never cut down."""
        if self.top_k > num_experts:
            raise ConfigError(
                "mix.top_k",
                f"got {self.top_k}, expected at most {num_experts} "
                f"(the mix has {num_experts} experts: {sources})",
            )
        if self.attention != "average" and self.attention_top_k > num_experts:
            raise ConfigError(
                "mix.attention_top_k",
                f"got {self.attention_top_k}, expected 0 (soft routing) to {num_experts} "
                f"(the mix has {num_experts} attention experts: {sources})",
            )


def mix_experts(num_domains: int, options: MixOptions, owners: bool = False) -> tuple[int, str]:
    """The expert count of a mix of `num_domains` branches (with the public expert for FlexOlmo
    and `public`; coordinated owners always carry it) and what they are."""
    public = options.with_public or owners
    count = num_domains + int(public)
    return count, ("the public one and " if public else "") + f"{num_domains} branches"


def check_compatible(models: Sequence[LanguageModel], names: Sequence[str]) -> LMConfig:
    """The branches' common dense config; a mismatch names the field and both models."""
    first = models[0].config
    if first.moe is not None:
        raise MoekitError(f"{names[0]}: an MoE (model.moe is set); mixing takes dense branches")
    ref = first.to_dict()
    for model, name in zip(models[1:], names[1:], strict=True):
        other = model.config.to_dict()
        for key in ref:
            if ref[key] != other.get(key):
                raise MoekitError(
                    f"{name}: model.{key} is {other.get(key)!r}, {names[0]} has {ref[key]!r}; "
                    "the branches must share one architecture"
                )
    return first


def mean_tensor(tensors: Sequence[Tensor]) -> Tensor:
    """Element-wise mean (in float64); a tensor every model shares unchanged is returned as is."""
    first = tensors[0]
    if all(torch.equal(first, t) for t in tensors[1:]):
        return first.clone()
    return torch.stack([t.double() for t in tensors]).mean(0).to(first.dtype)


def moe_config(dense: LMConfig, num_experts: int, options: MixOptions) -> LMConfig:
    """`dense` with an MoE of `num_experts` experts of the dense FFN's size in every layer."""
    from moekit.layer import MoEConfig
    from moekit.routing.spec import RouterSpec

    options.check_experts(num_experts, "one per source model")
    spec = RouterSpec(
        num_experts=num_experts,
        top_k=options.top_k,
        renorm="sum",
        router_bias=options.router == "flexolmo",
        negative_bias=options.router == "flexolmo",
    )
    moe = MoEConfig(hidden_size=dense.hidden_size, ff_size=dense.ff_size, router=spec)
    attention = None
    if options.attention != "average":
        from moekit.models.attention_experts import AttentionExpertsConfig

        attention = AttentionExpertsConfig(
            num_experts=num_experts,
            top_k=options.attention_top_k,
            shared_kv=options.attention == "shared_kv",
        )
    return dataclasses.replace(
        dense,
        moe=moe,
        first_dense_layers=0,
        moe_every=1,
        attention_experts=attention,
        parallel_block=dense.parallel_block or options.parallel,
    )


def is_expert_tensor(name: str) -> bool:
    """Tensors of the experts and their routers (FFN and attention), not averaged by `mix`."""
    return ".ffn." in name or ".attn.experts." in name or ".attn.router." in name


@torch.no_grad()
def mix_lm(
    branches: Sequence[LanguageModel],
    options: MixOptions,
    *,
    public: LanguageModel | None = None,
    router_rows: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[LanguageModel, dict[str, str]]:
    """The MoE of `branches` (expert order: the public model if given, then the branches) and each
    tensor's provenance. `router_rows`, per layer [E, H], replace the random init."""
    names = list(names or [f"branch {i}" for i in range(len(branches))])
    dense = check_compatible(
        [*branches, *([public] if public is not None else [])],
        [*names, PUBLIC][: len(branches) + (public is not None)],
    )
    sources = ([public] if public is not None else []) + list(branches)
    experts = len(sources)
    config = moe_config(dense, experts, options)
    dtype = branches[0].embed.weight.dtype
    moe = LanguageModel(config).to(dtype).eval()
    states = [b.state_dict() for b in branches]
    provenance: dict[str, str] = {}
    for name, tensor in moe.state_dict().items():
        if is_expert_tensor(name):
            continue
        tensor.copy_(mean_tensor([s[name] for s in states]))
        provenance[name] = f"mean of {name} over {len(branches)} branches"
    expert_names = ([PUBLIC] if public is not None else []) + names
    for i, block in enumerate(moe.blocks):
        ffn = block.ffn
        for e, source in enumerate(sources):
            ffn.experts.w_in[e].copy_(source.blocks[i].ffn.proj_in.weight)
            ffn.experts.w_out[e].copy_(source.blocks[i].ffn.proj_out.weight)
        provenance[f"blocks.{i}.ffn.experts.*"] = "expert e = FFN of " + ", ".join(expert_names)
        if config.attention_experts is not None:
            provenance.update(
                _fill_attention_experts(block.attn, [s.blocks[i].attn for s in sources], options, i)
            )
            provenance[f"blocks.{i}.attn.experts.*"] = "attention expert e = attention of " + ", ".join(
                expert_names
            )
        if router_rows is not None:
            rows = router_rows[i]
            if tuple(rows.shape) != (experts, config.hidden_size):
                raise MoekitError(
                    f"router rows of layer {i}: shape {tuple(rows.shape)}, "
                    f"expected {(experts, config.hidden_size)}"
                )
            ffn.router.weight.copy_(rows.to(dtype))
            provenance[f"blocks.{i}.ffn.router.weight"] = f"router init {options.router!r}"
        else:
            from moekit.construct.router_init import router_init

            seed = options.seed + 1000 + i
            ffn.router.weight.copy_(
                router_init(
                    "random", experts, config.hidden_size, seed=seed, std=options.router_std, dtype=dtype
                )
            )
            provenance[f"blocks.{i}.ffn.router.weight"] = f"router init 'random', seed {seed}"
        if options.router == "flexolmo":
            from moekit.domains.flexolmo import router_bias_vector

            ffn.router.bias.copy_(router_bias_vector(len(branches), options.bias).to(dtype))
            provenance[f"blocks.{i}.ffn.router.bias"] = (
                f"FlexOlmo: 0 for public, min({options.bias}, 0) for domains"
            )
    return moe, provenance


def _fill_attention_experts(
    attn, sources: Sequence[torch.nn.Module], options: MixOptions, layer: int
) -> dict[str, str]:
    """Attention expert e = the attention of source e (Q and O only when K/V are shared: those
    are averaged with the rest); the router random, as BAM's."""
    from moekit.construct.router_init import router_init

    for expert, source in zip(attn.experts, sources, strict=True):
        theirs = source.state_dict()  # an expert's tensors are named as the dense layer's
        for name, tensor in expert.state_dict().items():
            tensor.copy_(theirs[name])
    seed = options.seed + 2000 + layer
    weight = attn.router.weight
    weight.copy_(
        router_init(
            "random", weight.shape[0], weight.shape[1], seed=seed, std=options.router_std, dtype=weight.dtype
        )
    )
    return {f"blocks.{layer}.attn.router.weight": f"attention router init 'random', seed {seed}"}


@torch.no_grad()
def average_model(models: Sequence[LanguageModel]) -> LanguageModel:
    """The dense model whose every tensor is the branches' mean (the 'uniform soup')."""
    out = LanguageModel(models[0].config).to(models[0].embed.weight.dtype).eval()
    states = [m.state_dict() for m in models]
    for name, tensor in out.state_dict().items():
        tensor.copy_(mean_tensor([s[name] for s in states]))
    return out


@torch.no_grad()
def ffn_input_means(model: LanguageModel, ids_by_domain: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per layer, [D, H]: the mean input of the layer's FFN over each domain's token batches."""
    captured: dict[int, list[Tensor]] = {}

    def keep(i: int):
        def hook(_module, _args, out):
            captured.setdefault(i, []).append(out.reshape(-1, out.shape[-1]).double())

        return hook

    # the FFN's input is the output of the block's ffn_norm (dense and MoE blocks alike)
    hooks = [b.ffn_norm.register_forward_hook(keep(i)) for i, b in enumerate(model.blocks)]
    rows: list[list[Tensor]] = []
    try:
        for batches in ids_by_domain:
            captured.clear()
            for ids in batches:
                model(ids)
            rows.append([torch.cat(captured[i]).mean(0) for i in range(len(model.blocks))])
    finally:
        for h in hooks:
            h.remove()
    return [torch.stack([r[i] for r in rows]) for i in range(len(model.blocks))]


def router_rows_for(
    options: MixOptions,
    branches: Sequence[LanguageModel],
    public: LanguageModel | None,
    ids_by_domain: Sequence[Sequence[Tensor]],
) -> list[Tensor] | None:
    """Per-layer router rows of the `hidden` and `flexolmo` inits (None for `random`)."""
    from moekit.construct.router_init import hidden_router

    if options.router == "random":
        return None
    if options.router == "flexolmo":
        from moekit.domains.flexolmo import domain_embedding_rows

        if public is None:
            raise MoekitError("mix.router: 'flexolmo' needs the public (seed) model")
        return [domain_embedding_rows(m) for m in ffn_input_means(public, ids_by_domain)]
    means = ffn_input_means(average_model(branches), ids_by_domain)
    if public is not None:
        means = [torch.cat([m.mean(0, keepdim=True), m]) for m in means]
    return [hidden_router(m) for m in means]


def non_ffn_identical(moe: LanguageModel, source: LanguageModel) -> bool:
    """Whether the two compute the same function with the source's experts forced: every tensor
    outside the experts is bit-identical and the blocks are laid out alike (sequential/parallel)."""
    if moe.config.parallel_block != source.config.parallel_block:
        return False
    theirs = source.state_dict()
    return all(torch.equal(t, theirs[n]) for n, t in moe.state_dict().items() if not is_expert_tensor(n))


@torch.no_grad()
def forced_expert_checks(
    moe: LanguageModel, sources: Sequence[tuple[str, LanguageModel]], batches: Sequence[Tensor], text: str
) -> dict[str, Any]:
    """Step-0 check per expert: the mix with expert e forced (top-1, weight 1) in every layer, FFN
    and attention experts alike, vs the model expert e came from. Exact where the tensors outside
    the experts are identical."""
    from contextlib import nullcontext

    from moekit.construct.receipt import check_entry, step_zero
    from moekit.models.attention_experts import override_attention_routing
    from moekit.routing.override import RoutingOverride, override_routing

    checks = {}
    with_attention = moe.config.attention_experts is not None
    for e, (name, source) in enumerate(sources):

        def forced(ids, e=e):
            force = RoutingOverride(force=[e], top_k=1)
            attention = override_attention_routing(moe, force) if with_attention else nullcontext()
            with override_routing(moe, force), attention:
                return moe(ids).logits

        result = step_zero(lambda ids, source=source: source(ids).logits, forced, batches)
        entry = check_entry(result, non_ffn_identical(moe, source), moe.embed.weight.dtype, text)
        checks[f"expert_{e}_{name}"] = entry
    return checks


def load_lm(path: str | os.PathLike) -> LanguageModel:
    """A moekit LM from a run/checkpoint directory or an HF folder moekit's LM holds (Llama, Qwen2,
    Qwen3 and their MoEs)."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        from moekit.interop.lm_hf import lm_from_hf

        return lm_from_hf(folder).eval()
    from moekit.construct.lm import load_run_model

    return load_run_model(folder)[0]


def mix(
    branches_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: MixOptions | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Mix the branches of a `branch` folder into a moekit MoE run at `out_dir` (a checkpoint that
    `model.init_from` trains on and `moekit convert to-hf` exports); returns the receipt."""
    from moekit.construct.lm import load_run_model
    from moekit.construct.receipt import held_out_token_batches
    from moekit.domains.branch import read_branches
    from moekit.domains.data import calibration_ids, load_data

    options = options or MixOptions()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoekitError(f"{out}: already exists (pass --overwrite to replace it)")
    manifest = read_branches(branches_dir)
    domains = list(manifest["domains"])
    options.check_experts(*mix_experts(len(domains), options, manifest.get("parts") == "flexolmo"))
    if manifest.get("parts") == "flexolmo":
        return _mix_owners(manifest, out, options, branches_dir, overwrite=overwrite, log=log)
    loaded = [load_run_model(manifest["runs"][d]) for d in domains]
    models = [m for m, _ in loaded]
    public = load_lm(manifest["seed"]) if options.with_public else None
    if public is not None:
        public = public.to(models[0].embed.weight.dtype)
    data = load_data(manifest["source"], manifest["tokenizer"], log=lambda _: None)
    seq = min(manifest["seq_len"], models[0].config.max_seq_len)
    ids = [calibration_ids(data, d, documents=options.calibration_documents, seq_len=seq) for d in domains]
    rows = router_rows_for(options, models, public, ids)
    moe, provenance = mix_lm(models, options, public=public, router_rows=rows, names=domains)
    expert_domains = ([PUBLIC] if public is not None else []) + domains
    batches, text = held_out_token_batches(
        moe.config.vocab_size, corpus=manifest["source"], seq_len=seq, encode=data.tokenizer.encode
    )
    sources = list(zip(expert_domains, ([public] if public is not None else []) + models, strict=True))
    checks = forced_expert_checks(moe, sources, batches, text)
    failed = [n for n, c in checks.items() if c.get("exact_by_construction") and not c["passed"]]
    receipt = _write_mix(
        out,
        moe,
        loaded[0][1],
        expert_domains,
        provenance,
        checks,
        failed,
        options=options,
        branches_dir=branches_dir,
        overwrite=overwrite,
    )
    log(f"mixed {len(expert_domains)} experts ({', '.join(expert_domains)}) -> {out}")
    return receipt


def _mix_owners(manifest, out: Path, options: MixOptions, branches_dir, *, overwrite: bool, log):
    """FlexOlmo's merge of coordinated owner models (`domains.coordinated`), with the step-0 check
    that each owner alone (the others opted out) reproduces its own model."""
    from moekit.construct.lm import load_run_model
    from moekit.construct.receipt import held_out_token_batches
    from moekit.domains.coordinated import merge_owners, owner_checks
    from moekit.domains.data import load_data

    if options.router != "flexolmo":
        raise ConfigError(
            "mix.router", f"got {options.router!r}; branches of parts: flexolmo mix with 'flexolmo'"
        )
    if options.attention != "average" or options.parallel:
        raise ConfigError("mix.attention", "FlexOlmo's owners share the public attention; use average")
    domains = list(manifest["domains"])
    loaded = [load_run_model(manifest["runs"][d]) for d in domains]
    owners = [m for m, _ in loaded]
    moe, provenance = merge_owners(owners, domains, top_k=options.top_k)
    data = load_data(manifest["source"], manifest["tokenizer"], log=lambda _: None)
    seq = min(manifest["seq_len"], moe.config.max_seq_len)
    batches, text = held_out_token_batches(
        moe.config.vocab_size, corpus=manifest["source"], seq_len=seq, encode=data.tokenizer.encode
    )
    checks = owner_checks(moe, list(zip(domains, owners, strict=True)), batches, text)
    failed = [n for n, c in checks.items() if not c["passed"]]
    expert_domains = [PUBLIC, *domains]
    receipt = _write_mix(
        out,
        moe,
        loaded[0][1],
        expert_domains,
        provenance,
        checks,
        failed,
        options=options,
        branches_dir=branches_dir,
        overwrite=overwrite,
        coordinated=True,
    )
    log(f"merged {len(expert_domains)} FlexOlmo experts ({', '.join(expert_domains)}) -> {out}")
    return receipt


def _write_mix(
    out: Path,
    moe: LanguageModel,
    branch_state: dict[str, Any],
    expert_domains: list[str],
    provenance: dict[str, Any],
    checks: dict[str, Any],
    failed: list[str],
    *,
    options: MixOptions,
    branches_dir,
    overwrite: bool,
    coordinated: bool = False,
) -> dict[str, Any]:
    """The receipt and the run folder of a mix, written only when every step-0 check that must be
    exact passed (so a failed check leaves nothing on disk)."""
    if failed:
        raise MoekitError(f"mix: step-0 check failed for {', '.join(failed)} (nothing written)")
    receipt: dict[str, Any] = {
        "format": "moekit-mix-receipt",
        "version": 1,
        "branches": str(Path(branches_dir).resolve()),
        "options": options.to_dict(),
    }
    if coordinated:
        receipt["coordinated"] = True
    receipt |= {
        "expert_domains": expert_domains,
        "output": {"family": "moekit", "model": moe.config.to_dict()},
        "tensors": provenance,
        "checks": checks,
    }
    state = mixed_state(branch_state, moe, expert_domains, receipt["branches"])
    save_mixed(out, moe, state, receipt, overwrite=overwrite)
    return receipt


def mixed_state(branch_state: dict[str, Any], moe: LanguageModel, expert_domains: list[str], origin: str):
    """The state.json of a mixed checkpoint: the branches' run config with the MoE model."""
    return {
        "config": {**dict(branch_state.get("config", {})), "model": moe.config.to_dict()},
        "step": 0,
        "tokens_seen": 0,
        "domains": branch_state.get("domains", []),
        "expert_domains": list(expert_domains),
        "mixed_from": origin,
    }


def save_mixed(out: Path, moe: LanguageModel, state, receipt, *, overwrite: bool) -> None:
    """The checkpoint and its receipt, written into a temporary folder renamed into place."""
    from moekit.interop.hf import _write_dir
    from moekit.io import write_json_atomic
    from moekit.train.checkpoint import save_checkpoint

    def fill(tmp: Path) -> None:
        save_checkpoint(tmp / "checkpoints" / "step-000000", moe, None, state)
        write_json_atomic(tmp / RECEIPT_FILE, receipt)

    _write_dir(out, fill, overwrite)


def expert_domains_of(path: str | os.PathLike) -> tuple[LanguageModel, dict[str, Any], list[str]]:
    """A mixed model, its state and the domain of each expert."""
    from moekit.construct.lm import load_run_model

    model, state = load_run_model(path)
    domains = state.get("expert_domains")
    if model.config.moe is None or not isinstance(domains, list):
        raise MoekitError(f"{path}: not a mixed model (its state.json has no expert_domains)")
    return model, state, list(domains)
