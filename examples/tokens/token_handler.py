"""The handler: only the hooks this model needs differ from the defaults.

The defaults already pad each batch to its longest sequence (or to its length bucket) and pass
`(ids, mask)` to the model. This model also wants a CLS token in front of every sequence, and
answers with a label and a score rather than the two probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from token_model import CLS

from gpuserve.handler import Handler


class TokenHandler(Handler):
    def preprocess(self, instance: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        # Already checked against the spec: int64 ids within the vocabulary, at most 127 long.
        return np.concatenate([np.array([CLS], dtype=instance.dtype), instance])

    def postprocess(self, row: Any) -> Any:
        # The default gives the label and the softmax of the model's logits.
        answer = super().postprocess(row)
        return {"label": answer["label"], "score": answer["probabilities"].max()}
