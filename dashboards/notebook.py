"""A unit over the text in Jupyter: standalone HTML with BokehJS inlined (it renders offline, and in
a notebook saved and reopened). ``Run.show`` / ``Run._repr_html_`` call this."""
from __future__ import annotations

from .export import unit_figure


def unit_html(run, unit: str, start: int = 0, end: int | None = None) -> str:
    """The text from ``start`` to ``end`` (default: 3,000 characters) coloured by ``unit``
    (``"rnn.l0.c:199"``), as one HTML document with BokehJS inlined. The Run's text and names are
    data in the document's JSON, drawn on a canvas: none of it becomes markup."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE
    return file_html(unit_figure(run, unit, start, end), INLINE, title="rnnscope")
