import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))   # tests/reference.py

from rnnscope.zoo import Architecture, CharModel, Checkpoint, Vocab, save  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Corpora built in a test go to a private cache, never the user's."""
    monkeypatch.setenv("RNNSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_vocab() -> Vocab:
    return Vocab("\t\n \"#(),0;?abcdefghijklmnopqrstuvwxyz{}")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_vocab) -> Path:
    """A small random LSTM saved in the checkpoint format."""
    torch.manual_seed(0)
    model = CharModel(Architecture("lstm", len(tiny_vocab), 8, 16, 2))
    return save(model, tiny_vocab, {"name": "tiny", "test_loss": 0.0}, tmp_path / "tiny")


def char_model(arch: str, vocab: Vocab, hidden: int = 16, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    return Checkpoint(CharModel(Architecture(arch, len(vocab), 8, hidden, 2)).eval(), vocab, {"name": arch}, arch)


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium through selenium (the browser tests skip themselves where it is missing)."""
    from rnnscope.dashboards.export import chromium_driver
    d = chromium_driver(console_log=True)
    yield d
    d.quit()
