"""An encoder-decoder for ``rnnscope probe --source-modules``: an ``nn.RNN`` encoder over the source
letters, an ``nn.LSTMCell`` decoder called once per target letter with dot attention over the encoder.

    rnnscope probe --model examples/translate_sides.py:build --text pairs.jsonl --source-modules encoder \\
        --modules cell --grad --dtype float32 --out runs/pairs
    rnnscope analyze runs/pairs/encoder --features examples/translate_sides.py:features

``build()`` returns a ``Subject`` (the model, its encoder, its call). The encoder's unit 0 is planted to
say whether the source letter is a vowel (its embedding's first coordinate is +3 for a vowel, -3 for
any other letter, and unit 0 reads only that coordinate), so ``analyze RUN/encoder --features
examples/translate_sides.py:features`` finds it; every other weight is random. ``pairs(n)`` makes a
corpus: each line a random source word and its reverse as the target.
"""
import json
import sys

import numpy as np
import torch
from torch import nn

import rnnscope as rs

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
E, H = 6, 8


def encode(text: str) -> torch.Tensor:
    """``text`` (lowercase letters) -> ids ``[1, T]``, one per character (0 is kept for padding)."""
    return torch.tensor([[ALPHABET.index(ch) + 1 for ch in text]])


class Translator(nn.Module):
    """``(ids [1, T], source [1, S]) -> logits [1, T, V]``: the encoder over the source, then one cell call per
    target id, each after looking at the encoder's states with the cell's last h."""

    def __init__(self):
        super().__init__()
        self.embed, self.encoder = nn.Embedding(len(ALPHABET) + 1, E), nn.RNN(E, H, batch_first=True)
        self.cell, self.out = nn.LSTMCell(E + H, H), nn.Linear(H, len(ALPHABET) + 1)

    def forward(self, ids, source):
        enc, _ = self.encoder(self.embed(source))                       # [1, S, H]
        h = c = enc.new_zeros(len(ids), H)
        logits = []
        for t in range(ids.shape[1]):
            weights = torch.softmax((enc @ h[:, :, None])[:, :, 0], 1)  # [1, S]
            context = (weights[:, :, None] * enc).sum(1)
            h, c = self.cell(torch.cat([self.embed(ids[:, t]), context], 1), (h, c))
            logits.append(self.out(h))
        return torch.stack(logits, 1)


def translate(model, ids, document):
    return model(ids, encode(document["source"]))


def build() -> rs.Subject:
    torch.manual_seed(0)
    m = Translator().eval()
    with torch.no_grad():
        vowel = torch.tensor([0.0] + [3.0 if ch in "aeiou" else -3.0 for ch in ALPHABET])
        m.embed.weight[:, 0] = vowel
        m.encoder.weight_ih_l0[0] = torch.tensor([1.0] + [0.0] * (E - 1))
        m.encoder.weight_hh_l0[0] = 0
        m.encoder.bias_ih_l0[0] = m.encoder.bias_hh_l0[0] = 0
    return rs.Subject(m, encode, call=translate)


def features() -> dict:
    return {"vowel": lambda text: np.array([ch in "aeiou" for ch in text], np.int8)}


def pairs(n: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(ALPHABET), int(rng.integers(4, 12)))) for _ in range(n)]
    return [{"name": f"pair{i}", "source": w, "target": w[::-1]} for i, w in enumerate(words)]


if __name__ == "__main__":
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in pairs()))
