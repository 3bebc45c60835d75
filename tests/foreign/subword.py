"""3. An encoder whose tokenizer adds [BOS] and [EOS] steps and cuts text into greedy subwords, returning
offsets as Hugging Face tokenizers do (special tokens at (0, 0)); its head predicts the next subword
(so the default next-token loss applies). Trained for 60 updates."""
import sys
from pathlib import Path

import torch
from torch import nn

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402

TOKENIZER = kit.GreedySubwords(kit.sample("shakespeare.txt"))


class Encoder(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, vocab)

    def forward(self, ids):            # [B, T] -> [B, T, vocab]
        return self.head(self.lstm(self.embed(ids))[0])


@kit.once
def trained() -> Encoder:
    ids = torch.tensor(TOKENIZER(kit.sample("shakespeare.txt"))["input_ids"])
    return kit.fit(lambda: Encoder(len(TOKENIZER)), kit.windows(ids, 32, 16), kit.next_token, steps=60)


def load() -> Subject:
    return Subject(trained(), TOKENIZER, loss="auto", name="subword-encoder")
