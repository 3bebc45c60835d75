"""2. A bidirectional char tagger with a per-step 2-way output: is this character the last letter of a
word? (It needs the next character, so the reverse direction matters.) Trained for 80 updates."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402

CODEC = kit.Chars(kit.sample("shakespeare.txt"))
IS_LETTER = torch.tensor([c.isalpha() for c in CODEC.chars])


class Tagger(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 12)
        self.lstm = nn.LSTM(12, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 2)

    def forward(self, ids):            # [B, T] -> [B, T, 2]
        return self.head(self.lstm(self.embed(ids))[0])


def word_ends(ids: torch.Tensor) -> torch.Tensor:
    """ids [..., T] -> 1 where a letter is followed by a non-letter (or the end), else 0."""
    letter = IS_LETTER[ids]
    after = torch.cat([letter[..., 1:], torch.zeros_like(letter[..., :1])], -1)
    return (letter & ~after).long()


def tag_loss(output, ids):
    """The user's loss for --loss: per-step cross-entropy of the tags, output [1, T, 2], ids [T] -> [T]."""
    return F.cross_entropy(output[0], word_ends(ids), reduction="none")


@kit.once
def trained() -> Tagger:
    ids = CODEC(kit.sample("shakespeare.txt"))[0]
    return kit.fit(lambda: Tagger(len(CODEC)), kit.windows(ids, 48, 16),
                   lambda m, x: F.cross_entropy(m(x).flatten(0, 1), word_ends(x).flatten()), steps=80)


def load() -> Subject:
    """States only: the output is not next-token logits, so no loss."""
    return Subject(trained(), CODEC, loss=None, name="char-tagger")


def load_with_loss() -> Subject:
    return Subject(trained(), CODEC, loss=tag_loss, name="char-tagger")
