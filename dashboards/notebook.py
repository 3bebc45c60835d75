"""A unit over the text in Jupyter: standalone HTML with BokehJS inlined (it renders offline, and in
a notebook saved and reopened): ``rs.show(run, "rnn.l0.c:199")`` as the last line of a cell."""
from __future__ import annotations

from .export import unit_figure


def unit_html(run, unit: str, start: int = 0, end: int | None = None, document=None) -> str:
    """The text of steps ``start`` to ``end`` (default: 3,000 steps) coloured by ``unit``
    (``"rnn.l0.c:199"``), as one HTML document with BokehJS inlined. The Run's text and names are
    data in the document's JSON, drawn on a canvas: none of it becomes markup."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE
    return file_html(unit_figure(run, unit, start, end, document), INLINE, title="rnnscope")


class UnitView:
    """What ``rs.show`` returns: Jupyter calls ``_repr_html_`` and draws the unit inline."""

    def __init__(self, run, unit: str, start: int = 0, end: int | None = None):
        from rnnscope.store import Run, open_run
        self.run = run if isinstance(run, Run) else open_run(run)
        self.unit, self.start, self.end = unit, start, end
        unit_figure(self.run, unit, start, end)         # a bad unit or range fails here, not at display

    def __repr__(self) -> str:
        return f"UnitView({self.unit}, characters {self.start}-{self.end if self.end is not None else 'end'})"

    def _repr_html_(self) -> str:
        return unit_html(self.run, self.unit, self.start, self.end)


def show(run, unit: str, start: int = 0, end: int | None = None) -> UnitView:
    """``rs.show(run, "rnn.l0.c:199")``: the text coloured by one unit, inline in Jupyter."""
    return UnitView(run, unit, start, end)
