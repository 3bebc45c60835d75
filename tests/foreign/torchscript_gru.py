"""5. A TorchScript archive of a small char GRU language model: scripted with torch.jit.script, saved,
and loaded back with torch.jit.load, so rnnscope sees only the archive. Trained for 40 updates."""
import tempfile
import sys
from pathlib import Path

import torch
from torch import nn

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402
CODEC = kit.Chars(kit.sample("linux.c"))


class CharGRU(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 12)
        self.gru = nn.GRU(12, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, vocab)

    def forward(self, ids):            # [B, T] -> [B, T, vocab]
        out, _ = self.gru(self.embed(ids))
        return self.head(out)


@kit.once
def trained() -> CharGRU:
    """The eager model the archive is made from (the tests' reference)."""
    return kit.fit(lambda: CharGRU(len(CODEC)), kit.windows(CODEC(kit.sample("linux.c"))[0], 32, 8), kit.next_token, steps=40)


def save_archive(folder) -> Path:
    path = Path(folder) / "char_gru.pt"
    torch.jit.save(torch.jit.script(trained()), str(path))
    return path


@kit.once
def archive() -> Path:
    return save_archive(tempfile.mkdtemp(prefix="rnnscope-torchscript-"))


def encoder():
    """The archive's encoder, for --model char_gru.pt --encoder tests/foreign/torchscript_gru.py:encoder."""
    return CODEC


def load() -> Subject:
    return Subject(torch.jit.load(str(archive())), CODEC, loss="auto", name="torchscript-gru", source=str(archive()))
