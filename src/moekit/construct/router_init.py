"""Initial router weights [E, H] of an upcycled layer.

- random: N(0, std) rows (plain sparse upcycling; std 0.02 by default, an LM's usual init).
- zero: every expert scores the same; the router learns from a uniform start (ties break by index).
- hidden: mergekit-moe's `hidden` gate mode (mergekit `moe/router.py`): row e is the normalised
  mean hidden state, at the layer's FFN input, of expert e's prompts minus the mean over the other
  experts' prompts, so each expert starts preferring tokens like its prompts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.errors import ConfigError

ROUTER_INITS = ("random", "zero", "hidden")


def hidden_router(means: Tensor) -> Tensor:
    """Rows from per-expert mean hidden states [E, H]: each minus the others' mean, normalised."""
    e = means.shape[0]
    if e == 1:
        return torch.nn.functional.normalize(means, dim=-1)
    others = (means.sum(0, keepdim=True) - means) / (e - 1)
    return torch.nn.functional.normalize(means - others, dim=-1)


def router_init(
    kind: str,
    num_experts: int,
    hidden_size: int,
    *,
    seed: int = 0,
    std: float = 0.02,
    means: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    if kind == "zero":
        return torch.zeros(num_experts, hidden_size, dtype=dtype)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(num_experts, hidden_size, generator=gen, dtype=torch.float64) * std).to(dtype)
    if kind == "hidden":
        if means is None or tuple(means.shape) != (num_experts, hidden_size):
            raise ConfigError("router", "'hidden' needs the mean hidden state of each expert's prompts")
        return hidden_router(means.double()).to(dtype)
    raise ConfigError("router", f"got {kind!r}, expected one of {', '.join(ROUTER_INITS)}")


def expert_prompt_groups(texts_by_domain: dict[str, list[str]], num_experts: int) -> list[list[str]]:
    """Default prompts when none are given: expert e takes domain e mod D of the built-in corpus,
    and experts sharing a domain take disjoint slices of its documents."""
    domains = sorted(texts_by_domain)
    groups: list[list[str]] = []
    for e in range(num_experts):
        domain = domains[e % len(domains)]
        sharing = len(range(e % len(domains), num_experts, len(domains)))
        docs = texts_by_domain[domain]
        groups.append(docs[e // len(domains) :: sharing] or docs)
    return groups
