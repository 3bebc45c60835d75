"""How a page of steps lies over the text: the text view and the exporters draw a Run whose steps are
characters, subwords, words or bytes, and whose BOS, EOS or padding steps have no text at all.

Pure functions over the Run's arrays (``spans [S, 2]``, the documents table, ``ids``); no Bokeh.
A page is a window of steps inside one document. The characters it draws run from where its first
step's text starts to where the next page's starts, so the whitespace a word tokenizer skips between
two pages goes with the earlier one and no character is drawn on two pages. Each character is coloured by the
last step of the page whose span covers it (the state after reading it, as features take a step's
value at its last character), so byte-level steps that share a character draw it once. A step
without text is drawn as a marked cell of its own, ``⟨id 3⟩``, before the text of the step after it.
"""
from __future__ import annotations

import numpy as np

from rnnscope.errors import RnnscopeError


class Documents:
    """The Run's documents table as arrays: ``names``, ``step_start``, ``step_end``, ``char_start``,
    ``char_end`` (int64 [D]), and ``of(step)``."""

    def __init__(self, table):
        self.names = [str(n) for n in table["name"]]
        for col in ("step_start", "step_end", "char_start", "char_end"):
            setattr(self, col, np.asarray(table[col], np.int64))

    def __len__(self) -> int:
        return len(self.names)

    def of(self, step: int) -> int:
        """The document holding ``step``."""
        return int(np.searchsorted(self.step_end, step, side="right"))

    def search(self, query: str) -> np.ndarray:
        """int64: the documents whose name holds ``query`` (ignoring case), or whose index (from 0,
        ``N`` or ``#N``) it is, in order; every document for an empty query."""
        query = query.strip().casefold()
        if not query:
            return np.arange(len(self), dtype=np.int64)
        if not hasattr(self, "_folded"):
            self._folded = [n.casefold() for n in self.names]
        hits = [i for i, n in enumerate(self._folded) if query in n]
        index = _index(query)
        if index is not None and index < len(self) and index not in hits:
            hits = sorted(hits + [index])
        return np.asarray(hits, np.int64)

    def find(self, name_or_index: str | int) -> int:
        """A document by its name, or by its index counted from 0 (``N``, or ``#N`` always the index),
        as the picker lists them (``N: name``). A number that names one document and indexes another
        is refused rather than guessed; a Python int is always the index."""
        text = str(name_or_index)
        integer = isinstance(name_or_index, (int, np.integer)) and not isinstance(name_or_index, bool)
        text = f"#{text}" if integer else text
        named = self.names.index(text) if text in self.names and not integer else None
        index = _index(text)
        index = index if index is not None and index < len(self) else None
        if index is not None and (named in (None, index) or text.startswith("#")):
            return index
        if named is not None and index is not None:
            raise RnnscopeError(f"document {text!r} is ambiguous: document {named} is named {text!r}, and {text} is "
                                f"also the index of document {index} ({self.names[index][:40]!r})",
                                f"give '#{index}' for document {index}, or '#{named}' for the one named {text!r}")
        if named is not None:
            return named
        listed = ", ".join(self.names[:5]) + (", ..." if len(self) > 5 else "")
        raise RnnscopeError(f"the run has no document {text!r}",
                            f"name one ({listed}) or give an index from 0 to {len(self) - 1}")


def _index(text: str) -> int | None:
    """The document index ``text`` gives (``N`` or ``#N``, ASCII digits, counted from 0), else None."""
    digits = text[1:] if text.startswith("#") else text
    return int(digits) if digits.isascii() and digits.isdigit() else None


def page(docs: Documents, document: int, start: int, window: int) -> tuple[int, int]:
    """The steps ``[s, e)`` of the page starting at ``start``, kept inside ``document``."""
    a, b = int(docs.step_start[document]), int(docs.step_end[document])
    s = int(min(max(a, start), b - 1))
    return s, min(b, s + window)


def cut(spans: np.ndarray, docs: Documents, document: int, boundary: int) -> int:
    """The character where a page boundary before step ``boundary`` falls: the start of the first step
    with text from ``boundary`` on, the document's ends at its ends."""
    a, b = int(docs.step_start[document]), int(docs.step_end[document])
    if boundary <= a:
        return int(docs.char_start[document])
    starts = spans[boundary:b, 0]
    found = np.flatnonzero(starts >= 0)
    return int(starts[found[0]]) if len(found) else int(docs.char_end[document])


def page_chars(spans: np.ndarray, docs: Documents, document: int, s: int, e: int) -> tuple[int, int]:
    """The characters ``[c0, c1)`` the page of steps ``[s, e)`` draws."""
    return cut(spans, docs, document, s), cut(spans, docs, document, e)


def owners(spans: np.ndarray, s: int, e: int, c0: int, c1: int) -> np.ndarray:
    """``[c1 - c0]`` int64: the last step of ``[s, e)`` whose span covers each character, -1 for none.
    Starts and ends are non-decreasing within a document, so the last step starting at or before a
    character covers it exactly when its end lies beyond it."""
    page_spans = spans[s:e]
    text_steps = np.flatnonzero(page_spans[:, 0] >= 0)
    starts, ends = page_spans[text_steps, 0], page_spans[text_steps, 1]
    chars = np.arange(c0, c1)
    if not len(starts):
        return np.full(len(chars), -1, np.int64)
    last = np.searchsorted(starts, chars, side="right") - 1
    safe = np.maximum(last, 0)
    return np.where((last >= 0) & (ends[safe] > chars), s + text_steps[safe], -1).astype(np.int64)


def marker(ids: np.ndarray | None, step: int) -> str:
    """What a step without text shows: its input id, or its step number where the Run has no ids."""
    return f"\u27e8id {int(ids[step])}\u27e9" if ids is not None else f"\u27e8step {step}\u27e9"


def pieces(text: str, spans: np.ndarray, ids: np.ndarray | None, s: int, e: int, c0: int, c1: int):
    """What the page draws, in order: ``(drawn, step, pos)`` lists with one entry per character of
    ``text[c0:c1]`` (``drawn`` the character, ``step`` its owner or -1, ``pos`` its position) and one per
    step without text (``drawn`` its ``marker``, ``pos`` -1), placed before the text of the next
    step that has some (at the page's end when none follows)."""
    own = owners(spans, s, e, c0, c1)
    page_spans = spans[s:e]
    bare = s + np.flatnonzero(page_spans[:, 0] < 0)
    text_steps = s + np.flatnonzero(page_spans[:, 0] >= 0)
    nxt = np.searchsorted(text_steps, bare)
    following = np.append(spans[text_steps, 0], c1)        # the next text step's start, else the page's end
    if not len(bare):                                      # most pages: the text, one entry per character
        return list(text[c0:c1]), own, np.arange(c0, c1, dtype=np.int64)
    at = following[nxt]
    drawn, step, pos = [], [], []
    m = 0
    for c in range(c0, c1 + 1):
        while m < len(bare) and at[m] <= c:
            drawn.append(marker(ids, int(bare[m])))
            step.append(int(bare[m]))
            pos.append(-1)
            m += 1
        if c < c1:
            drawn.append(text[c])
            step.append(int(own[c - c0]))
            pos.append(c)
    return drawn, np.asarray(step, np.int64), np.asarray(pos, np.int64)


def span_text(text: str, spans: np.ndarray, a: int, b: int) -> str:
    """The text from the first to the last character of the steps ``[a, b)`` ('' when none has text)."""
    part = spans[a:b]
    part = part[part[:, 0] >= 0]
    return text[int(part[0, 0]):int(part[-1, 1])] if len(part) else ""
