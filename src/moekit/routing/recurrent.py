"""The layerwise recurrent router (Qiu et al. 2024, RMoE, #16): a GRU carries router state from one
MoE layer to the next.

Per layer l: x_l = W1^(l) h_l projects the hidden state to the router width d_r; a GRU cell updates
the state across *layers*, r_l = GRU(x_l, r_{l-1}) with r_0 = 0; logits z_l = W2^(l) r_l then go
through the ordinary spec-driven top-k (`choose_topk`). All tokens are processed in parallel; the
recurrence runs over depth. The state travels in `Routing.extras["router_state"]` [T, d_r], which
the MoE layer receives as `previous`, so gradients from layer l reach every earlier layer's W1.

The released code (`llama_moe_rnn`) shares *one* GRU cell across all layers, held at model level.
Each router here builds its own cell; `tie_recurrent_cells(model)` makes every recurrent router of
a model use the first one's cell, the paper's setting: with `shared_cell: true` (the default) the
model builder calls it once after building its layers (until it does, each layer keeps its own).

Spec axes: every `RouterSpec` axis of top-k selection (the selection bias excepted, whose update
lives with the token-choice router).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError, require_choice, require_int
from moekit.routing.base import SpecRouter
from moekit.routing.options import ROUTER_OPTIONS, require_bool
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import real_tokens, split_by_capacity
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import choose_topk, router_dtype

CELLS = ("gru", "rnn")
STATE_KEY = "router_state"


@dataclass(frozen=True)
class RecurrentOptions:
    """`state_size` d_r (the released config's `moe_router_rnn_hidden_size` is 256); `cell`: `gru`
    (the paper) or `rnn` (its plain tanh-RNN variant); `shared_cell`: one cell for all layers."""

    state_size: int = 256
    cell: str = "gru"
    shared_cell: bool = True

    def __post_init__(self) -> None:
        require_int(f"{ROUTER_OPTIONS}.state_size", self.state_size, minimum=1)
        require_choice(f"{ROUTER_OPTIONS}.cell", self.cell, CELLS)
        require_bool(f"{ROUTER_OPTIONS}.shared_cell", self.shared_cell)


def gru_cell(x: Tensor, r: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """RMoE (#16) state update, the GRU of Cho et al. 2014 in torch's layout ([reset | update | new]):

    rho = sigma(W_ir x + b_ir + W_hr r + b_hr),  zeta = sigma(W_iz x + b_iz + W_hz r + b_hz)
    n = tanh(W_in x + b_in + rho * (W_hn r + b_hn)),  r' = (1 - zeta) * n + zeta * r
    """
    gi_r, gi_z, gi_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = F.linear(r, w_hh, b_hh).chunk(3, dim=-1)
    reset = torch.sigmoid(gi_r + gh_r)
    update = torch.sigmoid(gi_z + gh_z)
    new = torch.tanh(gi_n + reset * gh_n)
    return (1 - update) * new + update * r


def rnn_cell(x: Tensor, r: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """RMoE's plain-RNN variant: r' = tanh(W_i x + b_i + W_h r + b_h)."""
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(r, w_hh, b_hh))


class RecurrentCell(nn.Module):
    """The cell's parameters (torch.nn.GRUCell's layout and init); arithmetic in the given dtype."""

    def __init__(self, size: int, kind: str):
        super().__init__()
        gates = 3 if kind == "gru" else 1
        self.kind = kind
        self.size = size
        self.w_ih = nn.Parameter(torch.empty(gates * size, size))
        self.w_hh = nn.Parameter(torch.empty(gates * size, size))
        self.b_ih = nn.Parameter(torch.empty(gates * size))
        self.b_hh = nn.Parameter(torch.empty(gates * size))
        bound = 1.0 / math.sqrt(size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        dtype = x.dtype
        step = gru_cell if self.kind == "gru" else rnn_cell
        return step(x, r, *(p.to(dtype) for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh)))


class RecurrentRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: RecurrentOptions) -> None:
        if spec.selection_bias:
            raise ConfigError("moe.router.selection_bias", "the recurrent router does not support it")

    def __init__(self, hidden_size: int, spec: RouterSpec, options: RecurrentOptions):
        super().__init__(spec, options)
        self.proj_in = nn.Parameter(torch.empty(options.state_size, hidden_size))  # W1^(l)
        self.cell = RecurrentCell(options.state_size, options.cell)
        self.proj_out = nn.Parameter(torch.empty(spec.num_experts, options.state_size))  # W2^(l)
        self.bias = nn.Parameter(torch.zeros(spec.num_experts)) if spec.router_bias else None
        nn.init.normal_(self.proj_in, std=hidden_size**-0.5)
        nn.init.normal_(self.proj_out, std=options.state_size**-0.5)

    def previous_state(self, previous: Routing | None, num_tokens: int, dtype: torch.dtype, device) -> Tensor:
        """r_{l-1}: the preceding MoE layer's state, or zeros for the first layer (or after a layer
        whose router keeps no state)."""
        state = None if previous is None else previous.extras.get(STATE_KEY)
        if state is None:
            return torch.zeros(num_tokens, self.options.state_size, dtype=dtype, device=device)
        if state.shape != (num_tokens, self.options.state_size):
            raise MoekitError(
                f"recurrent router: the previous layer's state has shape {tuple(state.shape)}, expected "
                f"({num_tokens}, {self.options.state_size}); every recurrent layer needs the same state_size"
            )
        return state.to(dtype)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Route T tokens of `x` [T, d] from the state in `previous.extras["router_state"]`."""
        num_tokens = x.shape[0]
        mask = real_tokens(token_mask, num_tokens, x.device)
        dtype = router_dtype(x.dtype)
        state_in = self.previous_state(previous, num_tokens, dtype, x.device)
        state = self.cell(F.linear(x.to(dtype), self.proj_in.to(dtype)), state_in)
        bias = None if self.bias is None else self.bias.to(dtype)
        logits = F.linear(state, self.proj_out.to(dtype), bias)
        scores, index, weights = choose_topk(logits, self.spec, None)
        chosen = Assignments.from_dense(index, weights, mask, num_experts=logits.shape[1])
        kept, dropped = split_by_capacity(chosen, self.spec, num_tokens, self.num_experts, generator)
        return Routing(logits, scores, kept, dropped, mask, self.num_experts, extras={STATE_KEY: state})


def tie_recurrent_cells(model: nn.Module) -> int:
    """Make every recurrent router of `model` with `shared_cell` use the first one's GRU cell (RMoE's
    single model-level cell); returns how many routers now share it. Call before building the
    optimizer."""
    routers = [m for m in model.modules() if isinstance(m, RecurrentRouter) and m.options.shared_cell]
    if not routers:
        return 0
    first = routers[0]
    for router in routers[1:]:
        if router.options.state_size != first.options.state_size or router.options.cell != first.options.cell:
            raise ConfigError(
                f"{ROUTER_OPTIONS}.shared_cell", "routers sharing a cell need the same state_size and cell"
            )
        router.cell = first.cell
    return len(routers)
