"""A character vocabulary: the card's ``vocab`` string, one character per id, in order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnscope.errors import RnnscopeError


@dataclass(frozen=True)
class Vocab:
    chars: str

    def __post_init__(self):
        if not isinstance(self.chars, str) or not self.chars or len(set(self.chars)) != len(self.chars):
            raise RnnscopeError("vocabulary must be a non-empty string with no repeated characters",
                                "give the vocabulary the model was trained with, one character per id")

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def unknown(self, text: str) -> list[tuple[int, str]]:
        """``[(position, char)]`` of every character of ``text`` not in the vocabulary."""
        known = set(self.chars)
        return [(i, c) for i, c in enumerate(text) if c not in known]

    def encode(self, text: str, unk: str | None = None) -> torch.Tensor:
        """``text -> LongTensor[1, time]``; unknown characters are an error unless ``unk`` names a stand-in."""
        if not text:
            raise RnnscopeError("the text is empty", "give a text of at least one character")
        index = self.index
        if unk is not None and unk not in index:
            raise RnnscopeError(f"--unk {unk!r} is itself not in the vocabulary", f"choose one of {self.chars!r}")
        bad = self.unknown(text)
        if bad and unk is None:
            shown = ", ".join(f"{c!r} (U+{ord(c):04X}) at {i}" for i, c in bad[:3])
            raise RnnscopeError(
                f"the text has {len(bad)} character(s) outside the model's vocabulary: {shown}"
                + (", ..." if len(bad) > 3 else ""),
                "pass --unk CHAR (e.g. --unk '?') to map them to a vocabulary character")
        fallback = index.get(unk, 0)
        return torch.tensor([[index.get(c, fallback) for c in text]], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)
