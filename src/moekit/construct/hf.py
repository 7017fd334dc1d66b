"""Upcycle a dense HF checkpoint folder into an MoE checkpoint of the matching HF family.

Llama and Mistral become Mixtral, Qwen2 Qwen2-MoE, Qwen3 Qwen3-MoE, OLMo 2 FlexOlmo (OLMo 2's
post-norm block with an MoE FFN; OLMoE has a pre-norm block and cannot hold an OLMo 2 model).
The MoE is built with transformers' own modules: attention, norms and embeddings are the dense
tensors by name, each layer's FFN becomes experts by a recipe of `construct.ffn`, and the router
starts as `construct.router_init` says. Routers renormalise their top-k weights (Mixtral always;
`norm_topk_prob=True` elsewhere), which makes copy-upcycling exact. The receipt is computed with
transformers on the written folder itself (reloaded by `from_pretrained`), before the folder is
renamed into place; an exact recipe that fails its check writes nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.construct.calibration import MAX_CALIBRATION_TOKENS, calibrate_dense
from moekit.construct.ffn import METHODS, PARTITIONS, DenseFFN, Experts, upcycle_ffn
from moekit.construct.receipt import check_entry, held_out_token_batches, step_zero, write_receipt
from moekit.construct.router_init import ROUTER_INITS, router_init
from moekit.errors import ConfigError, MoekitError
from moekit.io import read_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


@dataclass(frozen=True)
class Target:
    """The MoE family a dense family upcycles into, and how its config names the MoE fields."""

    family: str
    config_class: str
    experts_key: str
    ff_key: str
    extra: dict[str, Any] = field(default_factory=dict)
    shared_key: str | None = None  # the shared expert's intermediate size (Qwen2-MoE)
    # dense config fields the MoE family has no counterpart for, with the only value it can hold
    requires: dict[str, Any] = field(default_factory=dict)


_MOE_ROUTED = dict(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
TARGETS: dict[str, Target] = {
    "llama": Target(
        "mixtral",
        "MixtralConfig",
        "num_local_experts",
        "intermediate_size",
        dict(router_jitter_noise=0.0),
        requires=dict(attention_bias=False, mlp_bias=False, pretraining_tp=1),
    ),
    "mistral": Target(
        "mixtral", "MixtralConfig", "num_local_experts", "intermediate_size", dict(router_jitter_noise=0.0)
    ),
    "qwen2": Target(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "num_experts",
        "moe_intermediate_size",
        dict(_MOE_ROUTED, qkv_bias=True),
        shared_key="shared_expert_intermediate_size",
    ),
    "qwen3": Target(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "num_experts",
        "moe_intermediate_size",
        dict(_MOE_ROUTED),
        requires=dict(use_sliding_window=False),
    ),  # fmt: skip
    "olmo2": Target(
        "flex_olmo", "FlexOlmoConfig", "num_experts", "intermediate_size", dict(norm_topk_prob=True)
    ),
}
DENSE_FAMILIES = tuple(TARGETS)


@dataclass(frozen=True)
class UpcycleRecipe:
    """What `upcycle` builds; validated before any checkpoint is read."""

    num_experts: int
    top_k: int
    method: str = "copy"
    router: str = "auto"  # random for copy and drop, zero for split (whose all-active MoE is then exact)
    seed: int = 0
    drop_ratio: float = 0.5
    noise: float = 0.0
    shared: bool = False
    shared_fraction: float = 0.25
    partition: str = "contiguous"
    router_std: float = 0.02

    def __post_init__(self) -> None:
        from moekit.errors import require_choice, require_int, require_number

        if self.router == "auto":
            object.__setattr__(self, "router", "zero" if self.method == "split" else "random")
        require_int("experts", self.num_experts, minimum=1)
        require_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError("top_k", f"got {self.top_k}, expected at most experts={self.num_experts}")
        require_choice("method", self.method, METHODS)
        require_choice("router", self.router, ROUTER_INITS)
        require_choice("partition", self.partition, PARTITIONS)
        require_number("noise", self.noise, minimum=0.0)
        require_number("drop_ratio", self.drop_ratio, minimum=0.0)
        require_int("seed", self.seed, minimum=0)
        if self.drop_ratio > 1:
            raise ConfigError("drop_ratio", f"got {self.drop_ratio}, expected a number in [0, 1]")
        if not 0 < self.shared_fraction < 1:
            raise ConfigError("shared_fraction", f"got {self.shared_fraction}, expected a number in (0, 1)")

    def expert_ff_size(self, ff_size: int, where: str) -> int:
        """Each routed expert's intermediate size; refuses an FFN that does not divide."""
        if self.method != "split":
            return ff_size
        routed = ff_size - (round(self.shared_fraction * ff_size) if self.shared else 0)
        if routed % self.num_experts:
            raise ConfigError(
                "experts",
                f"{where}: the FFN's {routed} routed neurons (intermediate size {ff_size}"
                + (f" minus {ff_size - routed} shared" if self.shared else "")
                + f") do not divide into {self.num_experts} experts",
            )
        return routed // self.num_experts

    def shared_ff_size(self, ff_size: int) -> int:
        if not self.shared:
            return 0
        return ff_size if self.method != "split" else round(self.shared_fraction * ff_size)

    @property
    def exact(self) -> bool:
        """Exact at step 0 with the routed top-k: copy without noise."""
        return self.method == "copy" and self.noise == 0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def upcycle_layer(
        self, ffn: DenseFFN, layer: int, means: Tensor | None = None, activations: Tensor | None = None
    ) -> tuple[Experts, Tensor, str]:
        """Layer `layer`'s experts and initial router weight [E, H] by this recipe (seeded
        `seed + layer` and `seed + 1000 + layer`), and the router's provenance. `means` and
        `activations`: the layer's part of the calibration pass (`construct.calibration`)."""
        experts = upcycle_ffn(
            ffn,
            self.num_experts,
            self.method,
            seed=self.seed + layer,
            drop_ratio=self.drop_ratio,
            noise=self.noise,
            shared=self.shared,
            shared_fraction=self.shared_fraction,
            split_partition=self.partition,
            activations=activations,
        )
        router_seed = self.seed + 1000 + layer
        router = router_init(
            self.router,
            self.num_experts,
            ffn.gate.shape[1],
            seed=router_seed,
            std=self.router_std,
            means=means,
            dtype=ffn.gate.dtype,
        )
        seeded = f", seed {router_seed}" if self.router == "random" else ""
        return experts, router, f"router init {self.router!r}{seeded}"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoekitError("upcycling HF checkpoints needs transformers: pip install 'moekit[hf]'") from None
    return transformers


def read_dense_config(src: Path) -> tuple[dict[str, Any], Target]:
    """The source's config.json and its target family; refuses what cannot be upcycled."""
    if not src.is_dir():
        raise MoekitError(f"{src}: expected an HF model folder (config.json + safetensors) or a moekit run")
    data = read_json(src / "config.json", "HF config")
    if not isinstance(data, dict) or "model_type" not in data:
        raise MoekitError(f"{src / 'config.json'}: expected a JSON object with a model_type")
    model_type = data["model_type"]
    if model_type not in TARGETS:
        raise MoekitError(
            f"{src / 'config.json'}: model_type {model_type!r} is not a supported dense family "
            f"(expected one of {', '.join(DENSE_FAMILIES)})"
        )
    target = TARGETS[model_type]
    for key, value in target.requires.items():
        if key in data and data[key] != value:
            raise MoekitError(
                f"{src / 'config.json'}: {key}={data[key]!r} has no counterpart in {target.family} "
                f"(which needs {value!r})"
            )
    if data.get("hidden_act", "silu") != "silu":
        raise MoekitError(
            f"{src / 'config.json'}: hidden_act={data['hidden_act']!r}, expected 'silu' (SwiGLU)"
        )
    return data, target


def moe_config(dense_config: Any, target: Target, recipe: UpcycleRecipe) -> Any:
    """The target family's config: the dense fields it knows, plus the MoE fields."""
    transformers = _transformers()
    cls = getattr(transformers, target.config_class)
    known = set(cls().to_dict()) | {"head_dim"}
    from moekit.interop.hf import _FILE_FIELDS

    values = {k: v for k, v in dense_config.to_dict().items() if k in known and k not in _FILE_FIELDS}
    ff = dense_config.intermediate_size
    values.update(target.extra)
    values[target.experts_key] = recipe.num_experts
    values["num_experts_per_tok"] = recipe.top_k
    values[target.ff_key] = recipe.expert_ff_size(ff, "source")
    if target.family == "qwen2_moe":
        values["intermediate_size"] = ff
    if target.shared_key is not None:
        values[target.shared_key] = recipe.shared_ff_size(ff)
    elif recipe.shared:
        raise ConfigError(
            "shared", f"{target.family} has no shared expert (Qwen2-MoE has; Qwen2 sources become one)"
        )
    values["output_router_logits"] = False
    return cls(**values)


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def _dense_ffn(layer: nn.Module) -> DenseFFN:
    mlp = layer.mlp
    return DenseFFN(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())


def _fill_moe_block(block: nn.Module, experts: Experts, router: Tensor, family: str) -> None:
    block.gate.weight.copy_(router)
    block.experts.gate_up_proj.copy_(torch.cat([experts.gate, experts.up], dim=1))
    block.experts.down_proj.copy_(experts.down)
    if family != "qwen2_moe":
        return
    shared = block.shared_expert
    if experts.shared is None:  # an empty shared expert (size 0) adds nothing
        block.shared_expert_gate.weight.zero_()
        return
    shared.gate_proj.weight.copy_(experts.shared.gate)
    shared.up_proj.weight.copy_(experts.shared.up)
    # Qwen2-MoE gates the shared expert with sigmoid(x . g); g = 0 gives 0.5, so the down
    # projection is doubled (exact in binary floating point)
    shared.down_proj.weight.copy_(experts.shared.down * 2)
    block.shared_expert_gate.weight.zero_()


def encoder_of(src: Path):
    """The source's own tokenizer (text -> ids), or None when the folder has none."""
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
        return None
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception:  # a folder whose tokenizer does not load: receipts fall back to bytes
        return None
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def upcycle_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: UpcycleRecipe,
    *,
    dtype: torch.dtype | None = None,
    corpus: str = "builtin",
    prompts: list[list[str]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the upcycled MoE of the dense HF folder `src` to `dst`; returns the receipt.

    `dtype`: load and write the weights in this dtype (default: as stored). `corpus` supplies the
    held-out text of the receipt and the calibration text of `hidden` routers and `cluster`
    splits; `prompts` (one list of texts per expert) replace the default per-domain prompts.
    """
    from moekit.interop.hf import _write_dir

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise MoekitError(f"{dst}: already exists (pass --overwrite to replace it)")
    raw, target = read_dense_config(src)
    recipe.expert_ff_size(int(raw.get("intermediate_size", 0)), str(src / "config.json"))
    if recipe.shared and target.shared_key is None:
        raise ConfigError("shared", f"{target.family} has no shared expert; only qwen2 sources take --shared")
    if not any((src / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise MoekitError(f"{src}: no model.safetensors or model.safetensors.index.json (safetensors only)")
    transformers = _transformers()
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), local_files_only=True, dtype=dtype if dtype is not None else "auto", use_safetensors=True
    ).eval()
    dtype = dense.dtype
    config = moe_config(dense.config, target, recipe)
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    encode = encoder_of(src)
    vocab = dense.config.vocab_size
    means, acts = calibrate_dense(
        dense,
        [(layer.mlp, layer.mlp.down_proj) for layer in _layers(dense)],
        recipe,
        vocab_size=vocab,
        encode=encode,
        max_len=MAX_CALIBRATION_TOKENS,
        corpus=corpus,
        prompts=prompts,
    )
    moe = transformers.AutoModelForCausalLM.from_config(
        config, dtype=dtype, experts_implementation="eager"
    ).eval()
    provenance = _assemble(dense, moe, recipe, target.family, means, acts)

    def fill(tmp: Path) -> None:
        moe.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        receipt = {
            "source": {"path": str(src), "family": raw["model_type"], "kind": "hf"},
            "output": {"family": target.family, "architecture": config.architectures[0]},
            "recipe": recipe.to_dict(),
            "seeds": {"experts": recipe.seed, "router": recipe.seed},
            "tensors": provenance,
            "checks": _checks(dense, tmp, recipe, dtype, vocab, corpus, encode),
        }
        write_receipt(tmp, receipt)
        _require_passed(receipt, dst)
        written.append(receipt)

    written: list[dict[str, Any]] = []
    _write_dir(dst, fill, overwrite)
    return written[0]


def _require_passed(receipt: dict[str, Any], dst: Path) -> None:
    for name, check in receipt["checks"].items():
        if check.get("exact_by_construction") and not check["passed"]:
            raise MoekitError(
                f"{dst}: the {name} check failed (max |dlogit| {check['max_abs_logit_diff']:.3g} > "
                f"{check['tolerance']}): the MoE does not compute the dense model; nothing written"
            )


@torch.no_grad()
def _assemble(
    dense: nn.Module,
    moe: nn.Module,
    recipe: UpcycleRecipe,
    family: str,
    means: list[Tensor] | None,
    acts: list[Tensor] | None,
) -> dict[str, str]:
    """Copy the shared tensors, build every layer's experts and router; per-tensor provenance."""
    dense_state = dense.state_dict()
    moe_params = dict(moe.named_parameters(remove_duplicate=False))
    is_ffn = lambda name: ".mlp." in name  # noqa: E731
    provenance: dict[str, str] = {}
    wanted = sorted(n for n in moe_params if not is_ffn(n))
    have = sorted(n for n in dense_state if not is_ffn(n) and "rotary_emb" not in n)
    if set(wanted) != set(have):
        missing = sorted(set(wanted) - set(have))
        extra = sorted(set(have) - set(wanted))
        raise MoekitError(
            f"the dense model and {family} differ outside the FFNs: "
            + "; ".join(
                p
                for p in (
                    f"{family} needs {', '.join(missing[:3])}" if missing else "",
                    f"dense has {', '.join(extra[:3])}" if extra else "",
                )
                if p
            )  # fmt: skip
        )
    for name in wanted:
        moe_params[name].copy_(dense_state[name])
        provenance[name] = f"copy of {name}"
    for i, (d_layer, m_layer) in enumerate(zip(_layers(dense), _layers(moe), strict=True)):
        experts, router, router_provenance = recipe.upcycle_layer(
            _dense_ffn(d_layer),
            i,
            means=None if means is None else means[i],
            activations=None if acts is None else acts[i],
        )
        _fill_moe_block(m_layer.mlp, experts, router, family)
        prefix, source = f"model.layers.{i}.mlp.", f"model.layers.{i}.mlp.{{gate,up,down}}_proj.weight"
        provenance[prefix + "experts.gate_up_proj"] = f"{source}: {experts.provenance}"
        provenance[prefix + "experts.down_proj"] = f"{source}: {experts.provenance}"
        provenance[prefix + "gate.weight"] = router_provenance
        if family == "qwen2_moe":
            note = experts.shared_provenance or "empty (intermediate size 0)"
            provenance[prefix + "shared_expert.*"] = f"{source}: {note}; down x2 for the zero gate"
            provenance[prefix + "shared_expert_gate.weight"] = "zeros (sigmoid 0.5)"
    return provenance


def _checks(
    dense: nn.Module, folder: Path, recipe: UpcycleRecipe, dtype, vocab: int, corpus: str, encode
) -> dict[str, Any]:
    """Step 0 against the dense model with transformers on the written folder: the routed top-k,
    and for split every expert active (exact by construction)."""
    transformers = _transformers()
    batches, text = held_out_token_batches(vocab, corpus=corpus, encode=encode)

    def logits_of(model):
        return lambda ids: model(input_ids=ids).logits

    checks = {}
    moe = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, dtype=dtype, experts_implementation="eager"
    ).eval()
    checks["step0_top_k"] = check_entry(
        step_zero(logits_of(dense), logits_of(moe), batches), recipe.exact, dtype, text
    )
    if recipe.method == "split" and recipe.top_k < recipe.num_experts:
        all_on = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=dtype,
            experts_implementation="eager",  # the plain loop: float64 too
            num_experts_per_tok=recipe.num_experts,
        ).eval()
        exact = recipe.noise == 0 and recipe.router == "zero"  # weight 1/E on every expert
        checks["step0_all_experts"] = check_entry(
            step_zero(logits_of(dense), logits_of(all_on), batches), exact, dtype, text
        )
    return checks
