"""6. A GRU encoder-decoder: the encoder reads the text, the decoder starts from the encoder's final state
and rebuilds the text one character at a time (teacher forcing). Recorded module by module
(--modules encoder, --modules decoder). Trained for 80 updates on lines of Python."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402
CODEC = kit.Chars(kit.sample("python.py"))


class Seq2Seq(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.bos = vocab                           # one extra embedding row starts the decoder
        self.embed = nn.Embedding(vocab + 1, 16)
        self.encoder = nn.GRU(16, 32, batch_first=True)
        self.decoder = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, vocab)

    def forward(self, ids):            # [B, T] -> [B, T, vocab]: logits of ids itself
        _, h = self.encoder(self.embed(ids))
        shifted = torch.cat([torch.full_like(ids[:, :1], self.bos), ids[:, :-1]], 1)
        out, _ = self.decoder(self.embed(shifted), h)
        return self.head(out)


def copy_loss(output, ids):
    """Per-step reconstruction loss: output [1, T, vocab], ids [T] -> [T]."""
    return F.cross_entropy(output[0], ids, reduction="none")


@kit.once
def trained() -> Seq2Seq:
    ids = CODEC(kit.sample("python.py"))[0]
    return kit.fit(lambda: Seq2Seq(len(CODEC)), kit.windows(ids, 24, 16),
                   lambda m, x: F.cross_entropy(m(x).flatten(0, 1), x.flatten()), steps=80)


def encoder_only() -> Subject:
    return Subject(trained(), CODEC, loss=copy_loss, name="gru-seq2seq", modules=["encoder"])


def decoder_only() -> Subject:
    return Subject(trained(), CODEC, loss=copy_loss, name="gru-seq2seq", modules=["decoder"])


def load() -> Subject:
    return Subject(trained(), CODEC, loss=copy_loss, name="gru-seq2seq")
