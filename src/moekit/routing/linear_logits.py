"""The router's linear projection to expert logits, computed in fp32 (float64 for a float64 model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.routing.token_choice import router_logits


class LinearLogits(nn.Module):
    """z = W x (+ b) over `num_outputs` experts, with the arithmetic in the router dtype whatever
    the model dtype (as `TokenChoiceRouter.logits`)."""

    def __init__(self, hidden_size: int, num_outputs: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_outputs)) if bias else None
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return router_logits(x, self.weight, self.bias)
