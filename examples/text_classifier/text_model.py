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


def pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one batch: ids padded with 0 to the longest, and the mask of real
    tokens (used by training here, and by the handler's collate)."""
    longest = max(len(ids) for ids in sequences)
    ids = torch.zeros((len(sequences), longest), dtype=torch.int64)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
        mask[row, : len(tokens)] = True
    return ids, mask
