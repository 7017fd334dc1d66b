"""A declarative router spec whose axes, set independently, reproduce every HF MoE family.

The axes follow the survey of HF routing semantics (moe-systems.md §3): score function, whether
the score is taken before or after top-k, a selection bias kept apart from the weighting score,
group-limited selection, renormalisation, scaling, where the weight is applied, jitter. The
arithmetic is always fp32, whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number

SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")
SCORE_TIMINGS = ("before_topk", "after_topk")
GROUP_SCORES = ("top2_sum", "max")
RENORMS = ("none", "sum", "pnorm")
WEIGHT_TARGETS = ("output", "input")
JITTER_TARGETS = ("router", "router_and_experts")
DROP_POLICIES = ("position", "score", "random")


@dataclass(frozen=True)
class RouterSpec:
    """How a token-choice router turns logits into (expert, weight) choices.

    - `score_fn`: softmax, sigmoid, or none (raw logits).
    - `score_timing`: `before_topk` scores all experts then selects (Mixtral, Qwen, DeepSeek);
      `after_topk` selects on logits and scores only the chosen k (GPT-OSS, Granite: softmax over
      the k; Llama 4: sigmoid of each chosen logit).
    - `selection_bias`: a per-expert fp32 bias added to the score used for *selection* only, never
      to the weight (DeepSeek-V3 aux-loss-free balancing).
    - `num_groups`, `topk_groups`, `group_score`: group-limited selection; the groups with the
      highest group score (sum of each group's top-2, or its max) are kept (DeepSeek-V3).
    - `renorm`: divide the chosen weights by their sum, by their p-norm (`renorm_p`, DBRX), or not;
      `renorm_eps` is added to the denominator.
    - `scaling`: multiply the final weights (DeepSeek's routed scaling factor).
    - `weight_on`: apply the weight to the expert's output (default) or its input (Llama 4).
    - `router_bias`: the router's linear layer has a bias (GPT-OSS).
    - `negative_bias`: the bias enters as min(b, 0) on every expert but expert 0 and not at all
      on expert 0 (FlexOlmo's negative-only learnable bias; needs `router_bias`).
    - `jitter_eps`: in training, multiply the router input by U(1-eps, 1+eps); with
      `jitter_target="router_and_experts"` the experts see the jittered input too (HF Mixtral).
    - `capacity_factor`: None is dropless; otherwise each expert keeps at most
      ceil(factor * assignments / experts) and `drop_policy` decides which.
    """

    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    score_timing: str = "before_topk"
    selection_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    renorm: str = "none"
    renorm_p: float = 1.0
    renorm_eps: float = 0.0
    scaling: float = 1.0
    weight_on: str = "output"
    router_bias: bool = False
    negative_bias: bool = False
    jitter_eps: float = 0.0
    jitter_target: str = "router"
    capacity_factor: float | None = None
    drop_policy: str = "position"

    def __post_init__(self) -> None:
        require_int("router.num_experts", self.num_experts, minimum=1)
        require_int("router.top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                "router.top_k", f"got {self.top_k}, expected at most num_experts={self.num_experts}"
            )
        require_choice("router.score_fn", self.score_fn, SCORE_FUNCTIONS)
        require_choice("router.score_timing", self.score_timing, SCORE_TIMINGS)
        require_choice("router.group_score", self.group_score, GROUP_SCORES)
        require_choice("router.renorm", self.renorm, RENORMS)
        require_choice("router.weight_on", self.weight_on, WEIGHT_TARGETS)
        require_choice("router.jitter_target", self.jitter_target, JITTER_TARGETS)
        require_choice("router.drop_policy", self.drop_policy, DROP_POLICIES)
        require_int("router.num_groups", self.num_groups, minimum=1)
        require_int("router.topk_groups", self.topk_groups, minimum=1)
        if self.num_experts % self.num_groups:
            raise ConfigError(
                "router.num_groups",
                f"got {self.num_groups}, expected a divisor of num_experts={self.num_experts}",
            )
        if self.topk_groups > self.num_groups:
            raise ConfigError(
                "router.topk_groups", f"got {self.topk_groups}, expected at most num_groups={self.num_groups}"
            )
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            if self.group_score == "top2_sum" and per_group < 2:
                raise ConfigError("router.group_score", "top2_sum needs at least 2 experts per group")
            # kept groups holding fewer than top_k experts are allowed, as transformers allows them
            # (its DeepSeek-V3 test config takes 8 of 8 experts with 1 of 2 groups kept): the rest
            # come from the other groups, after every kept expert (`group_limited`)
            if self.score_timing != "before_topk":
                raise ConfigError(
                    "router.num_groups", "group-limited selection needs score_timing=before_topk"
                )
        require_number("router.renorm_p", self.renorm_p, minimum=0.0, strict=True)
        require_number("router.renorm_eps", self.renorm_eps, minimum=0.0)
        require_number("router.scaling", self.scaling)
        require_number("router.jitter_eps", self.jitter_eps, minimum=0.0)
        if self.jitter_eps >= 1:
            raise ConfigError("router.jitter_eps", f"got {self.jitter_eps}, expected a number in [0, 1)")
        if self.negative_bias and not self.router_bias:
            raise ConfigError(
                "router.negative_bias", "needs router.router_bias: true (the bias it constrains)"
            )
        if self.capacity_factor is not None:
            require_number("router.capacity_factor", self.capacity_factor, minimum=0.0, strict=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], field_prefix: str = "router") -> RouterSpec:
        require_known_fields(field_prefix, data, (f.name for f in fields(cls)))
        return cls(**data)

    def with_(self, **changes: Any) -> RouterSpec:
        return replace(self, **changes)


def _preset_table() -> dict[str, dict[str, Any]]:
    """Each HF family as spec axes (moe-systems.md §3; read from transformers' modeling files)."""
    return {
        # softmax(E) -> top-k -> divide by the sum; HF jitters the experts' input as well.
        "mixtral": dict(score_fn="softmax", renorm="sum", jitter_target="router_and_experts"),
        # softmax -> top-k, renormalised only when norm_topk_prob (False by default).
        "qwen2_moe": dict(score_fn="softmax", renorm="none"),
        # released Qwen3 checkpoints set norm_topk_prob=True.
        "qwen3_moe": dict(score_fn="softmax", renorm="sum"),
        "olmoe": dict(score_fn="softmax", renorm="none"),
        # sigmoid; selection on sigmoid + bias, group score = sum of top-2, keep topk_groups;
        # weights are the unbiased sigmoid, renormalised (+1e-20) and scaled.
        "deepseek_v3": dict(
            score_fn="sigmoid",
            selection_bias=True,
            group_score="top2_sum",
            renorm="sum",
            renorm_eps=1e-20,
            scaling=2.5,
        ),
        # top-k on logits (+ router bias), softmax over the chosen k.
        "gpt_oss": dict(score_fn="softmax", score_timing="after_topk", router_bias=True),
        # top-k on logits, sigmoid of each chosen logit, weight applied to the expert's input.
        "llama4": dict(score_fn="sigmoid", score_timing="after_topk", weight_on="input", top_k=1),
        # softmax -> top-k -> divide by the p-norm (moe_normalize_expert_weights, 1 by default).
        "dbrx": dict(score_fn="softmax", renorm="pnorm", renorm_p=1.0, jitter_target="router_and_experts"),
        # top-k on logits, softmax over the chosen k (GraniteMoe, JetMoe).
        "granitemoe": dict(score_fn="softmax", score_timing="after_topk"),
    }


PRESET_NAMES = tuple(_preset_table())


def preset(name: str, num_experts: int, top_k: int | None = None, **overrides: Any) -> RouterSpec:
    """The spec of an HF family, e.g. `preset("deepseek_v3", 64, 6, num_groups=8, topk_groups=4)`."""
    require_choice("router.preset", name, PRESET_NAMES)
    axes = dict(_preset_table()[name])
    default_k = axes.pop("top_k", 2)
    return RouterSpec(
        num_experts=num_experts, top_k=top_k if top_k is not None else default_k, **axes, **overrides
    )


def router_spec_from_dict(data: dict[str, Any], field_prefix: str = "router") -> RouterSpec:
    """A spec from config data; `preset: NAME` starts from an HF family and the other keys override it."""
    if not isinstance(data, dict):
        raise ConfigError(field_prefix, f"expected a mapping, got {type(data).__name__}")
    values = dict(data)
    name = values.pop("preset", None)
    if name is None:
        return RouterSpec.from_dict(values, field_prefix)
    for required in ("num_experts",):
        if required not in values:
            raise ConfigError(f"{field_prefix}.{required}", "missing (needed with a preset)")
    require_known_fields(field_prefix, values, (f.name for f in fields(RouterSpec)))
    require_choice(f"{field_prefix}.preset", name, PRESET_NAMES)
    num_experts = values.pop("num_experts")
    top_k = values.pop("top_k", None)
    axes = dict(_preset_table()[name])
    default_k = axes.pop("top_k", 2)
    axes.update(values)
    return RouterSpec(num_experts=num_experts, top_k=top_k if top_k is not None else default_k, **axes)
