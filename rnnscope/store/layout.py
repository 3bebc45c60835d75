"""The one step layout: how a Run's steps map to its text and its documents.

A step reads the characters ``text[start:end]`` of its span, or none (``(-1, -1)``: BOS, EOS,
padding); documents are runs of steps whose state was reset at their start, each over its own
characters. ``Run`` (on disk) and the analysis's ``Source`` (a Run, or a trace in memory) are both a
``StepLayout``; the writer builds its defaults with ``char_spans`` and ``one_document``.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError

from .docfields import with_fields


def char_spans(n: int, start: int = 0) -> np.ndarray:
    """``[n, 2]`` int64 spans of one step per character: ``[i, i + 1]``."""
    i = np.arange(start, start + n, dtype=np.int64)
    return np.stack([i, i + 1], 1)


def documents_frame(names, char_bounds, step_bounds, fields=()) -> pd.DataFrame:
    """The documents table from names and their ``len(names) + 1`` character and step boundaries, and
    a column per field of ``fields`` (one dict per document: a ``.jsonl`` line's label, ``docfields``)."""
    c, t = np.asarray(char_bounds, np.int64), np.asarray(step_bounds, np.int64)
    return with_fields(pd.DataFrame({"name": [str(n) for n in names], "char_start": c[:-1], "char_end": c[1:],
                                     "step_start": t[:-1], "step_end": t[1:]}), fields)


def one_document(chars: int, steps: int | None = None, name: str = "text") -> pd.DataFrame:
    """The documents table of a Run that is one document."""
    return documents_frame([name], [0, chars], [0, chars if steps is None else steps])


class StepLayout:
    """What follows from ``spans [steps, 2]``, ``documents`` (name, char_start, char_end, step_start,
    step_end) and ``chars``, the three things a subclass provides (and ``frames`` when its steps are
    input frames without text)."""
    spans: np.ndarray
    documents: pd.DataFrame
    chars: int
    frames = False

    @property
    def steps(self) -> int:
        return len(self.spans)

    @cached_property
    def has_text(self) -> np.ndarray:
        """``[steps]`` bool: the step reads at least one character (BOS, EOS and padding do not)."""
        return self.spans[:, 0] >= 0

    @cached_property
    def scored(self) -> np.ndarray:
        """``[steps]`` bool: the steps an analysis scores: those with text, or every step of a frames
        layout (a frame is what the step reads)."""
        return np.ones(self.steps, bool) if self.frames else self.has_text

    @cached_property
    def step_bounds(self) -> np.ndarray:
        """``[documents, 2]`` int64: each document's first step and the step after its last."""
        return self.documents[["step_start", "step_end"]].to_numpy(np.int64)

    @cached_property
    def step_document(self) -> np.ndarray:
        """``[steps]`` int64: the index of each step's document."""
        b = self.step_bounds
        return np.repeat(np.arange(len(b)), b[:, 1] - b[:, 0])

    @cached_property
    def char_level(self) -> bool:
        """One step per character and one document: every analysis then runs exactly as on a zoo Run."""
        return len(self.documents) == 1 and self.steps == self.chars and np.array_equal(self.spans,
                                                                                       char_spans(self.chars))

    def per_step(self, values) -> np.ndarray:
        """A per-character array ``[chars, ...]`` taken at each step: the value at the last character of
        the step's span (the state after reading it); NaN for steps without text. Returns float64 ``[steps, ...]``."""
        values = np.asarray(values)
        if values.shape[:1] != (self.chars,):
            raise RnnscopeError(f"per_step takes one value per character ({self.chars:,}), got shape "
                                f"{list(values.shape)}", "compute the feature over the text")
        out = np.full((self.steps,) + values.shape[1:], np.nan)
        out[self.has_text] = values[self.spans[self.has_text, 1] - 1]
        return out

    def step_tokens(self, text: str, start: int = 0, end: int | None = None) -> list[str]:
        """The text of steps ``start .. end - 1`` ('' for a step without text)."""
        return [text[a:b] if a >= 0 else "" for a, b in self.spans[start:end].tolist()]
