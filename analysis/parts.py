"""Which steps are scored, and how they split into a selection part and a held-out part.

Only steps with text are scored (BOS, EOS and padding have no character, so no feature value):
they are left out, never counted as zeros. With one document the split is by position, as it always
was: the first ``1 - heldout`` of the scored steps select, the rest are held out. With several
documents each part gets whole documents (the first ones select, the later ones are held out),
the boundary at the document edge that brings the held-out share closest to ``heldout``: a document
is one sequence whose state was reset at its start, and splitting one would let the selection part
see the start of what the held-out part reports on.

Each part remembers its documents' lengths (``segments``, in scored steps), so that a circular
shift of a feature can stay inside each document (``nulls.shifted``, ``nulls.circular_scores``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnscope.errors import RnnscopeError

MIN_PART = 10      # scored steps each part needs at least (fewer give no usable null)


@dataclass
class Split:
    rows: np.ndarray                   # [K] the scored steps (with text), in order
    at: int                            # position in ``rows`` of the first held-out step
    segments: tuple                    # (selection, held-out): scored steps per document, in order
    documents: tuple                   # (selection, held-out): document names
    step: int                          # the first held-out step

    @property
    def parts(self) -> list[np.ndarray]:
        return [self.rows[:self.at], self.rows[self.at:]]


def _segments(counts: np.ndarray) -> list[int]:
    return [int(c) for c in counts if c > 0]


def split_steps(src, heldout: float) -> Split:
    """Split ``src``'s scored steps into a selection and a held-out part (see the module's docstring)."""
    rows = np.flatnonzero(src.scored)
    K = len(rows)
    names = src.documents["name"].astype(str).tolist()
    counts = np.bincount(src.step_document[rows], minlength=len(names))
    what = "characters" if src.char_level else "scored steps"
    if not 0.0 < heldout < 1.0:
        raise RnnscopeError(f"cannot split {K} {what} with heldout={heldout}",
                            "use 0 < heldout < 1 and a text of at least a few hundred characters")
    if len(names) == 1:
        at = int(round(K * (1 - heldout)))
        if at < MIN_PART or K - at < MIN_PART:
            raise RnnscopeError(f"cannot split {K} {what} with heldout={heldout}",
                                "use 0 < heldout < 1 and a text of at least a few hundred characters")
        return Split(rows, at, ([at], [K - at]), (names, names), int(rows[at]))
    before = np.cumsum(counts)[:-1]                        # scored steps in the first k + 1 documents
    ok = (before >= MIN_PART) & (K - before >= MIN_PART)
    if not ok.any():
        raise RnnscopeError(f"cannot split {len(names)} documents ({K} scored steps) into two parts of at "
                            f"least {MIN_PART} steps each", "use more or longer documents")
    gap = np.where(ok, np.abs((K - before) / K - heldout), np.inf)
    k = int(np.argmin(gap)) + 1                            # the first held-out document
    at = int(before[k - 1])
    step = int(src.step_bounds[k, 0])
    return Split(rows, at, (_segments(counts[:k]), _segments(counts[k:])), (names[:k], names[k:]), step)
