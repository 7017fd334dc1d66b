"""The receipt of a construction: what was built from what, and how far it is from its source.

`upcycle_receipt.json` is written beside the checkpoint it describes (inside the folder, before
the folder is renamed into place, so a checkpoint never exists without its receipt). The step-0
check runs both models on held-out text and reports max |logit difference|, the relative L2 of the
logits and the next-token loss of each; recipes that are exact by construction say so and are
held to a tolerance (`passed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.io import write_json_atomic

RECEIPT_FILE = "upcycle_receipt.json"
RECEIPT_FORMAT = "moekit-upcycle-receipt"
# Exact recipes: the same sums in another order, with routing weights that HF routers compute in
# fp32 even in a float64 model (so float64 holds to ~1e-7, not to 1e-15).
EXACT_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}

Logits = Callable[[Tensor], Tensor]  # token ids [B, S] -> logits [B, S, V]


@dataclass(frozen=True)
class StepZero:
    tokens: int
    max_abs_logit_diff: float
    relative_l2: float
    dense_loss: float
    moe_loss: float

    @property
    def loss_diff(self) -> float:
        return self.moe_loss - self.dense_loss

    def to_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "relative_l2": self.relative_l2,
            "dense_loss": self.dense_loss,
            "moe_loss": self.moe_loss,
            "loss_diff": self.loss_diff,
        }


def next_token_loss(logits: Tensor, ids: Tensor) -> float:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)
    ).item()


@torch.no_grad()
def step_zero(dense: Logits, moe: Logits, batches: Sequence[Tensor]) -> StepZero:
    """Both models on the same token batches: logit distance and next-token loss of each."""
    worst, diff_sq, ref_sq, tokens = 0.0, 0.0, 0.0, 0
    dense_nll, moe_nll = 0.0, 0.0
    for ids in batches:
        a, b = dense(ids).double(), moe(ids).double()
        worst = max(worst, (a - b).abs().max().item())
        diff_sq += (a - b).square().sum().item()
        ref_sq += a.square().sum().item()
        n = ids[:, 1:].numel()
        dense_nll += next_token_loss(a, ids) * n
        moe_nll += next_token_loss(b, ids) * n
        tokens += n
    return StepZero(
        tokens, worst, (diff_sq / max(ref_sq, 1e-300)) ** 0.5, dense_nll / tokens, moe_nll / tokens
    )


def held_out_token_batches(
    vocab_size: int,
    *,
    corpus: str = "builtin",
    split: str = "validation",
    batches: int = 2,
    batch_size: int = 2,
    seq_len: int = 64,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[list[Tensor], str]:
    """Token batches of a corpus split, the first documents of every domain in equal shares (the
    same every time), encoded by `encode` (text -> ids) or as UTF-8 bytes folded into the vocabulary."""
    from moekit.data.build import default_cache_dir, load_corpus
    from moekit.data.splits import DEFAULT_FRACTIONS, split_corpus

    loaded = load_corpus(corpus, cache_dir=default_cache_dir(), log=lambda _: None)
    splits = split_corpus(loaded, DEFAULT_FRACTIONS)
    need = batches * batch_size * seq_len
    ids: list[int] = []
    per_domain = -(-need // len(splits.domains))  # every domain's first documents, equally
    for domain in splits.domains:
        taken: list[int] = []
        for doc in splits.documents(split, domain):
            taken += encode(doc.text) if encode is not None else [b % vocab_size for b in doc.text.encode()]
            if len(taken) >= per_domain:
                break
        ids += taken[:per_domain]
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    stacked = torch.tensor(ids, dtype=torch.long).view(batches, batch_size, seq_len)
    how = "tokenizer of the source" if encode is not None else f"UTF-8 bytes mod {vocab_size}"
    text = f"{corpus} corpus, {split} split, {need} tokens ({how})"
    return list(stacked.unbind(0)), text


def check_entry(result: StepZero, exact: bool, dtype: torch.dtype, text: str) -> dict[str, Any]:
    tolerance = EXACT_TOLERANCE.get(dtype, 1e-4)
    entry: dict[str, Any] = {"text": text, "dtype": str(dtype).removeprefix("torch."), **result.to_dict()}
    entry["exact_by_construction"] = exact
    if exact:
        entry["tolerance"] = tolerance
        entry["passed"] = result.max_abs_logit_diff <= tolerance
    return entry


def write_receipt(folder: Path, receipt: dict[str, Any]) -> Path:
    path = Path(folder) / RECEIPT_FILE
    write_json_atomic(path, {"format": RECEIPT_FORMAT, "version": 1, **receipt})
    return path


def summary(receipt: dict[str, Any]) -> str:
    """The lines `moekit upcycle` prints."""
    lines = []
    for name, check in receipt.get("checks", {}).items():
        status = ""
        if check.get("exact_by_construction"):
            status = (
                " (exact: " + ("ok" if check["passed"] else f"FAILED, tolerance {check['tolerance']}") + ")"
            )
        lines.append(
            f"{name}: max |dlogit| {check['max_abs_logit_diff']:.3g}, rel L2 {check['relative_l2']:.3g}, "
            f"loss {check['dense_loss']:.4f} -> {check['moe_loss']:.4f} ({check['loss_diff']:+.4f}){status}"
        )
    return "\n".join(lines)
