"""Train the example's tokenizer and classifier on a small corpus written here (no download).

python examples/text_classifier/build.py [--out DIR]

Writes `tokenizer.json` (a word-level tokenizer from the `tokenizers` library, trained on the
corpus) and `text.safetensors` (weights for `text_model.build`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from text_model import VOCAB, pad  # noqa: E402
from text_model import build as build_module  # noqa: E402

SUBJECTS = ["the film", "this phone", "the service", "our trip", "the food", "the book"]
GOOD = ["great", "wonderful", "excellent", "lovely", "fantastic"]
BAD = ["terrible", "awful", "boring", "broken", "horrible"]
TEMPLATES = ["{} was {}", "i found {} {}", "{} is really {}"]


def corpus() -> list[tuple[str, int]]:
    """Every sentence the templates make, labelled 0 (negative) or 1 (positive)."""
    return [
        (template.format(subject, word), label)
        for label, words in enumerate((BAD, GOOD))
        for template, subject, word in itertools.product(TEMPLATES, SUBJECTS, words)
    ]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]"])
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build(out: Path) -> Path:
    torch.manual_seed(5)
    out.mkdir(parents=True, exist_ok=True)
    sentences = corpus()
    tokenizer = train_tokenizer([text for text, _ in sentences])
    tokenizer.save(str(out / "tokenizer.json"))
    ids, mask = pad([tokenizer.encode(text).ids for text, _ in sentences])
    labels = torch.tensor([label for _, label in sentences])
    model = build_module()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        optimiser.step()
    path = out / "text.safetensors"
    save_file(model.state_dict(), str(path))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "artifacts")
    print(build(parser.parse_args().out))
