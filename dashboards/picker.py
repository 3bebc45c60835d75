"""The document picker: a search box and one page of the matching documents' names.

A Select holding every name of 10,000 documents sends all of them with the first paint and lays out
10,000 options in the browser; this one holds PICK at a time (the selected document always among
them), narrowed by what is typed, paged with two buttons.
"""
from __future__ import annotations

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import Button, Div, Select, TextInput

from .figures import shown_text

PICK = 100        # names listed at once
NAME = 60         # characters of a name shown


def document_options(docs, indices=None) -> list[tuple[str, str]]:
    """The picker's ``(index, label)`` options for ``indices`` (default: every document), labelled
    ``N: name`` with N counted from 0 as ``export --document N`` and the text view's label count:
    names with control and bidi characters made visible and cut short (a Select writes its labels as
    text, never as HTML)."""
    indices = range(len(docs)) if indices is None else indices
    return [(str(i), f"{i}: {shown_text(docs.names[i][:NAME])}{'...' if len(docs.names[i]) > NAME else ''}")
            for i in map(int, indices)]


def listed(matches: np.ndarray, at: int, current: int) -> list[int]:
    """The page of ``matches`` from position ``at``, with ``current`` first when it is not on it."""
    shown = [int(i) for i in matches[at:at + PICK]]
    return shown if current in shown else [current, *shown]


class DocumentPicker:
    """``search`` (a TextInput), ``select`` (the listed documents) and page buttons; ``pick(index)`` is
    called with the chosen document's index."""

    def __init__(self, docs, current: int, pick):
        self.docs, self.pick, self.at = docs, pick, 0
        self.matches = docs.search("")
        many = len(docs) > 1
        self.search = TextInput(title="find document", placeholder=f"name, or index 0-{len(docs) - 1:,}",
                                name="document_search", width=160, visible=many)
        self.select = Select(title=self._title(), value=str(current), name="document", width=220, visible=many,
                             options=document_options(docs, listed(self.matches, 0, current)))
        self.back, self.on = (Button(label=label, width=34, name=name, visible=len(docs) > PICK)
                              for label, name in (("\u25c2", "documents_back"), ("\u25b8", "documents_on")))
        self.search.on_change("value_input", lambda a, o, n: self._find(n))
        self.select.on_change("value", lambda a, o, n: self._chosen(n))
        self.back.on_click(lambda: self._turn(-PICK))
        self.on.on_click(lambda: self._turn(+PICK))
        self.root = row(self.search, self.select, column(Div(text="", height=12, disable_math=True),
                                                         row(self.back, self.on)))

    def _title(self) -> str:
        """What the list holds, never a count from 1 beside indices from 0: unfiltered, the indices
        listed (``0-99 of 10,000``); filtered, the matches and the page of them."""
        n = len(self.matches)
        if n <= PICK and n == len(self.docs):
            return "document"
        if n == len(self.docs):
            return f"document ({self.at:,}-{min(self.at + PICK, n) - 1:,} of {n:,})"
        pages = f", page {self.at // PICK + 1} of {-(-n // PICK)}" if n > PICK else ""
        return f"document ({n:,} match{'es' if n > 1 else ''}{pages})" if n else "document (none match)"

    def _list(self) -> None:
        current = int(self.select.value)
        self.select.options = document_options(self.docs, listed(self.matches, self.at, current))
        self.select.title = self._title()
        self.back.visible = self.on.visible = len(self.matches) > PICK

    def _find(self, query: str) -> None:
        self.matches, self.at = self.docs.search(query or ""), 0
        self._list()

    def _turn(self, by: int) -> None:
        at = self.at + by
        if 0 <= at < len(self.matches):
            self.at = at
            self._list()

    def _chosen(self, value: str) -> None:
        if value.isdigit() and int(value) < len(self.docs):
            self.pick(int(value))

    def show(self, document: int) -> None:
        """Mirror the selection's document (listed first when it is not on the page)."""
        if self.select.value != str(document):
            self.select.value = str(document)
            self._list()
