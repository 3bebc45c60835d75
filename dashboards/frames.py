"""A frames Run's pictures (its steps are input frames: audio, sensor readings, no text): one unit as a
line over its time stamps, and the units of its key as a heatmap over the same steps. The dashboard
shows them in place of the text; ``rnnscope export RUN --unit KEY:I`` writes both, one above the other.
"""
from __future__ import annotations

import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from .figures import heatmap_figure, plain

MAX_ROWS = 64           # the heatmap's units: a whole small layer; more would be rows a pixel high


def line_data(times: np.ndarray, values: np.ndarray, start: int) -> dict:
    """The line's source: ``times [T]`` float64 stamps, ``values [T]`` of the unit, steps from ``start``."""
    return {"time": np.asarray(times, np.float64), "value": np.asarray(values, np.float64),
            "step": np.arange(start, start + len(values))}


def line_figure(data: dict, title: str, width: int = 1400) -> tuple:
    """One unit's value against its steps' time stamps; returns the figure and its source."""
    src = ColumnDataSource(data)
    p = figure(width=width, height=300, name="unit_line", tools="xpan,xwheel_zoom,box_zoom,reset",
               toolbar_location="above")
    p.title.text = plain(title)
    p.line("time", "value", source=src, line_width=1.5, color="#1f5fa8")
    p.scatter("time", "value", source=src, size=3, color="#1f5fa8")
    p.xaxis.axis_label, p.yaxis.axis_label = "time", "value"
    p.add_tools(HoverTool(tooltips=[("step", "@step"), ("time", "@time{0.000}"), ("value", "@value{0.0000}")]))
    return p, src


def key_rows(run, key: str, index: int) -> list[str]:
    """The heatmap's units: ``key``'s first ``MAX_ROWS`` units, and ``index`` among them."""
    n = run[key].shape[1]
    rows = list(range(min(n, MAX_ROWS)))
    if index not in rows:
        rows[-1] = index
    return [f"{key}:{i}" for i in rows]


def frames_figure(run, key: str, index: int, s: int, e: int, where: str = "", width: int = 1400):
    """Steps ``[s, e)`` of a frames Run: unit ``key:index`` against time, over its key's units x steps."""
    unit = f"{key}:{index}"
    line, _ = line_figure(line_data(run.times[s:e], np.asarray(run[key][s:e, index], np.float64), s),
                          f"{unit}, steps {s:,}-{e:,}{where}", width)
    labels = key_rows(run, key, index)
    matrix = np.asarray(run[key][s:e], np.float32)[:, [int(lab.rsplit(":", 1)[1]) for lab in labels]].T
    heat, _, _ = heatmap_figure(matrix, labels, s, width=width, axis="step",
                                title=f"{key}: {len(labels)} units, steps {s:,}-{e:,} (each row on its own scale)")
    return column(line, heat, name="frames_view")


class LineView:
    """The dashboard's view of a frames Run in place of the text: the selected unit over the page's
    steps against their time stamps, and the info line above it (``TextView``'s interface)."""

    def __init__(self, data, sel):
        from .views import div
        self.data, self.sel = data, sel
        self.info = div("", name="unit_info", width=700)
        self.plot, self.source = line_figure(self._data(), self._title())
        self.source.name = "line_source"
        self._info()
        sel.watch(self.update)

    def _data(self) -> dict:
        s, e = self.data.span(self.sel)
        run = self.data.run
        return line_data(run.times[s:e], np.asarray(run[self.sel.key][s:e, self.sel.index], np.float64), s)

    def _title(self) -> str:
        s, e = self.data.span(self.sel)
        return f"{self.sel.unit}, steps {s:,}-{e:,}"

    def update(self, changed: set[str]) -> None:
        if changed & {"start", "document", "key", "index"}:
            self.source.data = self._data()
            self.plot.title.text.text = self._title()       # a PlainText: never typeset
        self._info()

    def _info(self) -> None:
        from . import queries as q
        s, e = self.data.span(self.sel)
        values = np.asarray(self.source.data["value"])
        where = q.page_label(self.data.word, s, e, self.data.steps, self.data.docs, self.sel.document)
        half = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        self.info.text = q.unit_info(self.data.neurons, self.sel.unit, where, half)
