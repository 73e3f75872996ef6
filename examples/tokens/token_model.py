"""A small transformer classifier over token ids of any length, that honours a padding mask.

`forward(ids, mask)`: ids [B, L] int64, mask [B, L] bool (True at real tokens), as gpuserve's
default collate passes a padded batch.
"""

from __future__ import annotations

import torch

VOCAB = 1000
MAX_LENGTH = 128
CLS = 1  # the id the handler puts in front of every sequence


class TokenClassifier(torch.nn.Module):
    def __init__(self, d_model: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d_model)
        self.position = torch.nn.Embedding(MAX_LENGTH, d_model)
        layer = torch.nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        # No nested tensors: the same arithmetic whether or not a batch holds padding.
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)
        x = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1)  # the mean over real tokens only
        return self.head(pooled)


def build() -> torch.nn.Module:
    return TokenClassifier()
