"""The calibration pass of upcycling: what a recipe reads from the dense model before its FFNs
become experts, for moekit's LM and transformers' models alike.

Two recipes read the dense model on text: a `hidden` router starts from each expert's mean FFN
input on that expert's prompts, and split's `cluster` partition groups the FFN's neurons by their
activations on training text. (Compression's calibration, `moekit.compress.calibrate`, reads the
routing of an MoE; a dense model has none, so this pass is its own.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moekit.construct.receipt import held_out_token_batches
from moekit.construct.router_init import expert_prompt_groups
from moekit.errors import ConfigError

if TYPE_CHECKING:
    from moekit.construct.hf import UpcycleRecipe

# the longest sequence the pass runs: a prompt is cut to it, training text is read in rows of it
MAX_CALIBRATION_TOKENS = 128


@torch.no_grad()
def calibrate_dense(
    dense: nn.Module,
    ffns: list[tuple[nn.Module, nn.Module]],
    recipe: UpcycleRecipe,
    *,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None,
    max_len: int,
    corpus: str,
    prompts: list[list[str]] | None,
) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """Per layer: each expert's mean FFN input [E, H] (router `hidden`) and the FFN's intermediate
    activations [tokens, I] on training text (split `cluster`), float64; None where the recipe
    reads neither.

    `ffns`: per layer, the FFN module (its input is the layer's FFN input) and its down projection
    (its input is the intermediate activation). `encode`: text -> ids (None: UTF-8 bytes folded
    into the vocabulary); prompts are cut to `max_len` tokens, training text is read in rows of
    `min(max_len, 128)`. `prompts`: one list of texts per expert (default: the corpus's training
    documents, grouped by domain)."""
    need_means = recipe.router == "hidden"
    need_acts = recipe.method == "split" and recipe.partition == "cluster"
    if not (need_means or need_acts):
        return None, None
    captured: dict[str, list[Tensor]] = {}

    def keep(key: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

        return hook

    hooks = []
    for i, (ffn, down) in enumerate(ffns):
        hooks.append(ffn.register_forward_pre_hook(keep(f"in{i}")))
        hooks.append(down.register_forward_pre_hook(keep(f"act{i}")))
    n = len(ffns)

    def prompt_ids(text: str) -> Tensor:
        ids = encode(text) if encode is not None else [b % vocab_size for b in text.encode()]
        return torch.tensor([ids[:max_len] or [0]], dtype=torch.long)

    try:
        means = None
        if need_means:
            if prompts is None:
                prompts = _domain_prompts(corpus, recipe.num_experts)
            if len(prompts) != recipe.num_experts:
                raise ConfigError(
                    "prompts",
                    f"got {len(prompts)} prompt lists, expected one per expert ({recipe.num_experts})",
                )
            rows = []
            for group in prompts:
                captured.clear()
                for text in group[:4]:
                    dense(prompt_ids(text))
                rows.append([torch.cat(captured[f"in{i}"]).mean(0) for i in range(n)])
            means = [torch.stack([r[i] for r in rows]) for i in range(n)]
        acts = None
        if need_acts:
            captured.clear()
            batches, _ = held_out_token_batches(
                vocab_size,
                corpus=corpus,
                split="train",
                seq_len=min(max_len, MAX_CALIBRATION_TOKENS),
                encode=encode,
            )
            for ids in batches:
                dense(ids)
            acts = [torch.cat(captured[f"act{i}"]) for i in range(n)]
    finally:
        for h in hooks:
            h.remove()
    return means, acts


def _domain_prompts(corpus: str, num_experts: int) -> list[list[str]]:
    """The first training documents of each of the corpus's domains, in one group per expert."""
    from moekit.data.build import default_cache_dir, load_corpus
    from moekit.data.splits import DEFAULT_FRACTIONS, split_corpus

    loaded = load_corpus(corpus, cache_dir=default_cache_dir(), log=lambda _: None)
    splits = split_corpus(loaded, DEFAULT_FRACTIONS)
    by_domain = {d: [doc.text for doc in splits.documents("train", d)[:32]] for d in splits.domains}
    return expert_prompt_groups(by_domain, num_experts)
