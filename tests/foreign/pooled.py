"""4. An LSTM inside a custom module, read by attention pooling into one output per sequence: which
shipped sample (Shakespeare, Linux C, Python) a snippet comes from. Trained for 100 updates."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402

SOURCES = ["shakespeare.txt", "linux.c", "python.py"]
CODEC = kit.Chars("".join(kit.sample(s) for s in SOURCES))


class Body(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 12)
        self.lstm = nn.LSTM(12, 20, batch_first=True)

    def forward(self, ids):
        return self.lstm(self.embed(ids))[0]


class Classifier(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.body = Body(vocab)
        self.score = nn.Linear(20, 1)
        self.out = nn.Linear(20, len(SOURCES))

    def forward(self, ids):            # [B, T] -> [B, sources]
        h = self.body(ids)
        weights = torch.softmax(self.score(h), dim=1)
        return self.out((weights * h).sum(1))


def shakespeare_loss(output, ids):
    """A scalar: minus the log-probability that the text is Shakespeare (its gradient shows which steps argue for it)."""
    return -torch.log_softmax(output[0], -1)[0]


@kit.once
def trained() -> Classifier:
    texts = [CODEC(kit.sample(s))[0] for s in SOURCES]
    draws = [kit.windows(t, 40, 8) for t in texts]

    def batches(g):
        return torch.cat([d(g) for d in draws])

    labels = torch.arange(len(SOURCES)).repeat_interleave(8)
    return kit.fit(lambda: Classifier(len(CODEC)), batches, lambda m, x: F.cross_entropy(m(x), labels), steps=100)


def load() -> Subject:
    """States only: the output is one vector per sequence."""
    return Subject(trained(), CODEC, loss=None, name="attention-pooled")


def load_with_loss() -> Subject:
    return Subject(trained(), CODEC, loss=shakespeare_loss, name="attention-pooled")
