"""The training batch of a causal language model, as every moekit trainer consumes it.

All six tensors are [B, S]. A row holds one or more document pieces (packed layout) or one piece
and padding (padded layout). `targets[b, s]` is the token that follows `input_ids[b, s]` in the
same document, or IGNORE_INDEX where there is none (a document's last token, padding): the loss
never crosses a document boundary. `doc_ids` numbers the pieces in the batch (-1 on padding), so
attention can be confined to a piece; `positions` restart at 0 at each piece, for RoPE with
packing. `domains` is the domain label, for evaluation and analysis only: never a model input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moekit.errors import MoekitError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # [B, S] int64
    targets: Tensor  # [B, S] int64, IGNORE_INDEX where no loss
    token_mask: Tensor  # [B, S] bool, true on real tokens
    doc_ids: Tensor  # [B, S] int64, piece index unique within the batch, -1 on padding
    positions: Tensor  # [B, S] int64, position within the piece
    domains: Tensor  # [B, S] int64, domain label index, -1 on padding

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        if len(shape) != 2:
            raise MoekitError(f"Batch.input_ids: expected shape [B, S], got {list(shape)}")
        for f in fields(self):
            tensor = getattr(self, f.name)
            expected = torch.bool if f.name == "token_mask" else torch.int64
            if tensor.shape != shape or tensor.dtype != expected:
                raise MoekitError(
                    f"Batch.{f.name}: expected {expected} of shape {list(shape)}, "
                    f"got {tensor.dtype} of shape {list(tensor.shape)}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.token_mask.sum())

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def attention_mask(self) -> Tensor:
        """[B, S, S] bool: query s may attend to key t iff both are in the same piece and t <= s.

        A padding position attends to itself only, so that a softmax over each row stays finite.
        """
        same_piece = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        real = self.token_mask[:, :, None] & self.token_mask[:, None, :]
        seq = self.input_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=self.input_ids.device).tril()
        diagonal = torch.eye(seq, dtype=torch.bool, device=self.input_ids.device)
        return (same_piece & real & causal) | diagonal
