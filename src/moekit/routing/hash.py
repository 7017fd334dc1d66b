"""Hash routing on token ids (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a baseline
with no learned router.

Each vocabulary id is sent to k fixed experts drawn once from a seeded generator (the paper's
"random hash"; k > 1 is its multi-hash variant), whatever the hidden state, with weight 1/k. The
table is a buffer, saved with the model. The record's scores are the hash's one-hot choice / k (a
distribution without gradient), its logits zero: balancing objectives have nothing to train here.

The router needs the token ids: `MoE.forward_with_routing(..., token_ids=...)`, which the language
model passes from its `input_ids`.

Spec axes: `top_k` = k hash functions (distinct experts per id).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import MoekitError, require_int
from moekit.routing.base import SpecRouter
from moekit.routing.options import ROUTER_OPTIONS, require_spec_defaults
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import real_tokens
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import router_dtype


@dataclass(frozen=True)
class HashOptions:
    """`vocab_size`: ids the table covers; `seed`: the table's generator seed."""

    vocab_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        require_int(f"{ROUTER_OPTIONS}.vocab_size", self.vocab_size, minimum=1)
        require_int(f"{ROUTER_OPTIONS}.seed", self.seed, minimum=0)


def random_hash_table(vocab_size: int, num_experts: int, k: int, seed: int) -> Tensor:
    """[vocab, k] int64: for every id, k distinct experts in a uniformly random order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, num_experts, generator=generator).argsort(dim=-1)[:, :k].contiguous()


class HashRouter(SpecRouter):
    routes_on_token_ids = True

    @staticmethod
    def check_config(spec: RouterSpec, options: HashOptions) -> None:
        require_spec_defaults(spec, "hash", set())

    def __init__(self, hidden_size: int, spec: RouterSpec, options: HashOptions):
        super().__init__(spec, options)
        self.register_buffer(
            "table", random_hash_table(options.vocab_size, spec.num_experts, spec.top_k, options.seed)
        )

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
        token_ids: Tensor | None = None,
    ) -> Routing:
        """Route T tokens by their ids `token_ids` [T]; the hidden state `x` sets only shape and dtype."""
        num_tokens = x.shape[0]
        if token_ids is None:
            raise MoekitError(
                "the hash router routes on token ids: pass token_ids to MoE.forward_with_routing"
            )
        ids = token_ids.reshape(-1).to(torch.long)
        if ids.shape[0] != num_tokens:
            raise MoekitError(f"token_ids: expected {num_tokens} ids, got shape {tuple(token_ids.shape)}")
        mask = real_tokens(token_mask, num_tokens, x.device)
        real_ids = ids[mask]
        if real_ids.numel() and (int(real_ids.min()) < 0 or int(real_ids.max()) >= self.options.vocab_size):
            raise MoekitError(
                f"token_ids: expected ids in [0, {self.options.vocab_size}) "
                f"({ROUTER_OPTIONS}.vocab_size), got {int(real_ids.min())}..{int(real_ids.max())}"
            )
        k = self.spec.top_k
        dtype = router_dtype(x.dtype)
        choice = self.table[ids.clamp(0, self.options.vocab_size - 1)]  # [T, k]
        scores = torch.zeros(num_tokens, self.num_experts, dtype=dtype, device=x.device)
        scores.scatter_(-1, choice, 1.0 / k)
        weights = torch.full(choice.shape, 1.0 / k, dtype=dtype, device=x.device)
        kept = Assignments.from_dense(choice, weights, mask, num_experts=self.num_experts)
        logits = torch.zeros_like(scores)
        return Routing(logits, scores, kept, Assignments.empty(x.device), mask, self.num_experts)
