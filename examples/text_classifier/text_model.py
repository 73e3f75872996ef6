"""A small text classifier over token ids: embeddings, the mean over real tokens, a linear head.

`forward(ids, mask)`: ids [B, L] int64, mask [B, L] bool (True at real tokens), as the
handler's collate passes a padded batch.
"""

from __future__ import annotations

import torch

VOCAB = 512  # the tokenizer is trained to at most this many entries
MAX_TOKENS = 64  # longer texts are cut to this many tokens


class TextClassifier(torch.nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.tanh(pooled))


def build() -> torch.nn.Module:
    return TextClassifier()
