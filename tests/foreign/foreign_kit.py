"""What the foreign spec files share: the shipped texts, a char codec, a greedy subword tokenizer
with Hugging Face-style offsets, and a short training loop. Spec files are loaded by path (not as a
package), so they put this folder on ``sys.path`` and import it as ``foreign_kit``."""
from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from rnnscope.zoo import SAMPLES

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples"


def sample(name: str, chars: int | None = None) -> str:
    """A shipped sample (``shakespeare.txt``, ``linux.c``, ``python.py``), optionally its first ``chars``."""
    text = (SAMPLES / name).read_text()
    return text if chars is None else text[:chars]


_TRAINED: dict = {}


def once(fn):
    """``@once def trained()``: the model is trained once per process, even when its spec file is
    imported twice (by the tests and again by ``rnnscope.load``, each under its own module name)."""
    key = (Path(fn.__code__.co_filename).name, fn.__qualname__)

    def cached():
        if key not in _TRAINED:
            _TRAINED[key] = fn()
        return _TRAINED[key]
    return cached


def load_file(path: Path):
    """Import a Python file by path once per process (the way a spec file is loaded)."""
    name = f"_rnnscope_foreign_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Chars:
    """A char model's codec: one id per character, so a plain ``str -> ids [1, T]`` callable."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __call__(self, text: str) -> torch.Tensor:
        return torch.tensor([[self.index.get(c, 0) for c in text]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.chars)


class GreedySubwords:
    """A tiny subword tokenizer called like a Hugging Face one: ``tok(text, return_offsets_mapping=True)``
    gives ``{"input_ids": [...], "offset_mapping": [(start, end), ...]}`` with ``[BOS]`` and ``[EOS]``
    at (0, 0), as special tokens are there. Pieces: single characters plus the most frequent 2-4
    character substrings of the training text; encoding takes the longest piece at each position."""

    SPECIAL = ["[UNK]", "[BOS]", "[EOS]"]

    def __init__(self, text: str, pieces: int = 200):
        counts: dict[str, int] = {}
        for n in (2, 3, 4):
            for i in range(len(text) - n + 1):
                s = text[i:i + n]
                if not any(c.isspace() for c in s[1:]):      # a piece may start at a space, never span words
                    counts[s] = counts.get(s, 0) + 1
        frequent = sorted(counts, key=lambda s: (-counts[s], s))[:pieces]
        self.vocab = self.SPECIAL + sorted(set(text)) + sorted(frequent)
        self.index = {p: i for i, p in enumerate(self.vocab)}
        self.longest = max(len(p) for p in self.vocab)

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict:
        ids, offsets, i = [self.index["[BOS]"]], [(0, 0)], 0
        while i < len(text):
            n = next(n for n in range(min(self.longest, len(text) - i), 0, -1)
                     if n == 1 or text[i:i + n] in self.index)
            ids.append(self.index.get(text[i:i + n], 0))
            offsets.append((i, i + n))
            i += n
        ids.append(self.index["[EOS]"])
        offsets.append((0, 0))
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def __len__(self) -> int:
        return len(self.vocab)


@contextmanager
def one_thread():
    """Train these tiny models on one thread: their ops are too small to share, and on a busy machine a
    second thread only waits (measured on 2 busy cores: the five probe tests 104 s with two threads, 17 s with
    one). One thread also trains the same model on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(make, batches, loss_fn, steps: int, lr: float = 1e-2, seed: int = 0) -> torch.nn.Module:
    """``make()`` a model (after seeding, so its initial weights never depend on what ran before) and
    give it ``steps`` Adam updates (a step count, not seconds, so every machine trains the same model):
    ``batches(generator) -> inputs`` and ``loss_fn(model, inputs) -> scalar``."""
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with one_thread():
        for _ in range(steps):
            loss = loss_fn(model, batches(g))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
    return model.eval()


def windows(ids: torch.Tensor, length: int, batch: int):
    """``batches`` for ``fit``: ``batch`` random windows of ``length`` ids from ``ids [N]`` -> ``[batch, length]``."""
    def draw(g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - length, (batch,), generator=g)
        return torch.stack([ids[s:s + length] for s in starts.tolist()])
    return draw


def next_token(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` for ``fit`` of a language model ``[B, T] -> [B, T, V]``: mean next-token cross-entropy."""
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
