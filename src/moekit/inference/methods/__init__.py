"""Test-time routing methods built on routing overrides (`moekit.routing.override`): each changes
what the routers decide at inference, without retraining, for every model moekit runs, and
reports its extra compute as a `MethodCost`.

- `scmoe`: self-contrast decoding between strong and weak routing (SCMoE, #11).
- `rewire`: a router-logit bias optimised on the prompt's own next-token loss (Rewiring, #28).
- `steer`: a fixed bias towards the experts a reference domain uses (multilingual steering, #50).
- `des`: best-of-N with a per-trajectory number of experts k (Dynamic Experts Search, #27).
- `odp`: skip a token's second expert when its weight is small (MC-MoE's online pruning, #38).
- `c3po`: re-mix the last prompt token's routing weights from solved neighbours (C3PO, #29).
- `cipher`: the math tasks in a letter-substitution language, parallel by construction (#50).
"""

from moekit.inference.methods.c3po import C3POResult, Reference, c3po, c3po_generate, make_reference
from moekit.inference.methods.cipher import CipheredProblem, cipher, decipher
from moekit.inference.methods.cost import MethodCost
from moekit.inference.methods.des import DESResult, des_search, k_schedule
from moekit.inference.methods.odp import odp_overrides
from moekit.inference.methods.rewire import RewireResult, rewire
from moekit.inference.methods.scmoe import scmoe_generate, self_contrast_logits
from moekit.inference.methods.steer import expert_frequencies, steering_overrides

__all__ = [
    "C3POResult",
    "CipheredProblem",
    "Reference",
    "c3po",
    "c3po_generate",
    "cipher",
    "decipher",
    "make_reference",
    "DESResult",
    "MethodCost",
    "RewireResult",
    "des_search",
    "expert_frequencies",
    "k_schedule",
    "odp_overrides",
    "rewire",
    "scmoe_generate",
    "self_contrast_logits",
    "steering_overrides",
]
