"""Raw text in: the handler tokenises each text in `preprocess` and pads a batch in `collate`.

The tokenizer is the one `build.py` trained (the `tokenizers` library), read from
`artifacts/tokenizer.json` beside this file when the model loads. The rest (forward, split,
and the label with softmax probabilities) are gpuserve's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from text_model import MAX_TOKENS, pad
from tokenizers import Tokenizer

from gpuserve.handler import Handler, Padded

TOKENIZER = Path(__file__).resolve().parent / "artifacts" / "tokenizer.json"


class TextHandler(Handler):
    def load(self, device: torch.device) -> Any:
        self.tokenizer = Tokenizer.from_file(str(TOKENIZER))
        self.unknown = self.tokenizer.token_to_id("[UNK]")
        return super().load(device)

    def preprocess(self, instance: Any) -> np.ndarray[Any, Any]:
        # One text (the spec's input is a string), already checked to be UTF-8.
        text = instance.item() if isinstance(instance, np.ndarray) else instance
        ids = self.tokenizer.encode(text).ids[:MAX_TOKENS] or [self.unknown]
        return np.asarray(ids, dtype=np.int64)

    def collate(self, items: list[np.ndarray[Any, Any]]) -> Padded:
        ids, mask = pad([item.tolist() for item in items])
        lengths = [(len(item),) for item in items]
        # Left on the host: gpuserve copies it to the device (pinned, without blocking).
        return Padded(ids, mask, lengths)
