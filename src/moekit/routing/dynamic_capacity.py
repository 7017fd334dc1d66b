"""Dynamic-capacity routing (UniMoE-Audio's DCMoE, #2): top-p over routed and null experts, with
shared experts always on.

One gate scores N_r routed experts and N_n null experts, P = softmax(X W_g); each token takes the
smallest set I whose probability reaches p (`top_p_selection`, the rule of the paper's top-P
equation), so its number of routed experts ranges over [0, ceil(p (N_r + N_n))]: a token whose set
is only null experts runs on the shared experts alone. The paper's output is
O = sum_{i in I} (P_i / sum_{j in I} P_j) E_i(X) + shared experts, i.e. `router.renorm="sum"`
(renormalised over the whole set I, null experts included, whose share is simply not computed).

Followed: the paper. The released `UniMoEV2.py` also gates the shared experts with a softmax of the
full logits masked to (selected + shared) and rescales the routed weights by the total dynamic mass
(`cal_global_weight`); here the shared experts are the layer's ordinary `num_shared_experts`
(optionally behind `moe.shared_gate`), which the factory requires to be at least one.

Spec axes as for `top_p` (`top_k` caps the experts per token over routed + null, at most N_r).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import require_int
from moekit.routing.options import ROUTER_OPTIONS, require_fraction, require_softmax_set_spec
from moekit.routing.spec import RouterSpec
from moekit.routing.top_p import TopPRouter


@dataclass(frozen=True)
class DynamicCapacityOptions:
    """`p`: the mass threshold over routed + null experts (0.7 and `num_null` = 1 are the DCMoE
    training script's settings, a sibling model of UniMoE-Audio)."""

    p: float = 0.7
    num_null: int = 1

    def __post_init__(self) -> None:
        require_fraction(f"{ROUTER_OPTIONS}.p", self.p)
        require_int(f"{ROUTER_OPTIONS}.num_null", self.num_null, minimum=1)


class DynamicCapacityRouter(TopPRouter):
    """softmax over N_r routed + N_n null experts -> top-p set -> weights -> capacity on routed:
    the top-p router with `num_null` zero-compute experts after the routed ones."""

    @staticmethod
    def check_config(spec: RouterSpec, options: DynamicCapacityOptions) -> None:
        require_softmax_set_spec(spec, "dynamic_capacity")

    @property
    def extra_experts(self) -> int:
        return self.options.num_null
