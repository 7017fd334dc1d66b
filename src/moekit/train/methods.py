"""What some research routers need from the training loop beyond the LM loss and balancing.

- THOR (#33): two forward passes with independently sampled experts, both cross-entropies, plus
  alpha times the symmetric KL between the two output distributions.
- LoRAMoE (#36): the localised balancing constraint over two sample types; here a sample is a
  document and its type is whether its domain is one of `loramoe_knowledge_domains`. The released
  formula, CV^2(Q * I), pulls a sample's weight away from its matching group of experts, against
  the paper's intent; `loramoe_form: intended` (the default) uses CV^2(Q / I), which pulls it
  toward them, `published` the formula as released (tests/test_train_methods.py shows both).
- Dense-to-sparse gates (EvoMoE, #51) anneal their temperature: every router with a
  `set_step(step, total_steps)` method is told the step before each optimizer step.

Each extra term is added as a sum over the micro-batch's target tokens (term x targets), because
`accumulate_gradients` divides the summed loss by the global number of targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.balance.stats import sequence_index
from moekit.balance.step import ForwardOutput
from moekit.data.batch import IGNORE_INDEX, Batch
from moekit.errors import ConfigError, require_choice, require_number
from moekit.routing.objectives_research import loramoe_localized_balance_loss, thor_consistency_loss

LORAMOE_FORMS = ("intended", "published")


@dataclass(frozen=True)
class MethodConfig:
    """Training-loop extras of research methods (all off by default)."""

    thor_alpha: float = 0.0
    loramoe_weight: float = 0.0
    loramoe_delta: float = 0.1
    loramoe_knowledge_domains: tuple[str, ...] = ("english", "multilingual")
    loramoe_form: str = "intended"

    def __post_init__(self) -> None:
        require_number("methods.thor_alpha", self.thor_alpha, minimum=0.0)
        require_number("methods.loramoe_weight", self.loramoe_weight, minimum=0.0)
        require_number("methods.loramoe_delta", self.loramoe_delta, minimum=0.0)
        if self.loramoe_delta >= 1:
            raise ConfigError(
                "methods.loramoe_delta", f"got {self.loramoe_delta}, expected a number in [0, 1)"
            )
        require_choice("methods.loramoe_form", self.loramoe_form, LORAMOE_FORMS)
        domains = self.loramoe_knowledge_domains
        if not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) for d in domains):
            raise ConfigError(
                "methods.loramoe_knowledge_domains", f"got {domains!r}, expected a list of domain names"
            )
        object.__setattr__(self, "loramoe_knowledge_domains", tuple(self.loramoe_knowledge_domains))


def summed_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch.targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def run_model(model: nn.Module, batch: Batch):
    return model(
        batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids, token_mask=batch.token_mask
    )


def lm_forward(model: nn.Module, batch: Batch) -> ForwardOutput:
    """Summed next-token cross-entropy of a batch and the model's routing records."""
    out = run_model(model, batch)
    return ForwardOutput(loss_sum=summed_cross_entropy(out.logits, batch), routings=out.routings)


def make_forward(
    model: nn.Module, methods: MethodConfig, domains: tuple[str, ...]
) -> Callable[[Batch], ForwardOutput]:
    """The per-micro-batch forward of a training step, with the configured method terms."""
    if methods.thor_alpha == 0 and methods.loramoe_weight == 0:
        return lambda batch: lm_forward(model, batch)
    knowledge = [domains.index(d) for d in methods.loramoe_knowledge_domains if d in domains]

    def forward(batch: Batch) -> ForwardOutput:
        out = run_model(model, batch)
        loss = summed_cross_entropy(out.logits, batch)
        targets = batch.targets != IGNORE_INDEX
        if methods.thor_alpha > 0:
            second = run_model(model, batch)
            consistency = thor_consistency_loss(out.logits, second.logits, targets)
            loss = loss + summed_cross_entropy(second.logits, batch)
            loss = loss + methods.thor_alpha * consistency * targets.sum()
        if methods.loramoe_weight > 0:
            types = (~torch.isin(batch.domains, torch.tensor(knowledge))).long().reshape(-1)
            samples, _ = sequence_index(batch.token_mask, batch.doc_ids)
            constraint = sum(
                loramoe_localized_balance_loss(
                    r,
                    types,
                    methods.loramoe_delta,
                    samples,
                    toward_matching=methods.loramoe_form == "intended",
                )
                for r in out.routings
            )
            loss = loss + methods.loramoe_weight * constraint * targets.sum()
        return ForwardOutput(loss_sum=loss, routings=out.routings)

    return forward


def announce_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Tell every router that schedules itself by step (e.g. a dense-to-sparse gate) the step."""
    for module in model.modules():
        set_step = getattr(module, "set_step", None)
        if callable(set_step) and module is not model:
            set_step(step, total_steps)
