"""The dashboard's views. Each reads the one ``Selection``, updates its own sources when the fields it
shows change, and writes the selection when the user picks something in it; none reads another.

Every text-bearing model that may hold a Run's strings is a ``Div`` with ``disable_math=True`` fed
escaped HTML (``queries.esc``), a ``DataTable`` (its ``StringFormatter`` writes cells as text), or a
canvas label given as ``PlainText``.
"""
from __future__ import annotations

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (Button, ColumnDataSource, DataTable, Div, Select, Spinner, StringFormatter,
                          TableColumn)

from . import queries as q
from .picker import DocumentPicker
from .figures import columns as cell_columns, fit, heatmap_figure, set_heatmap, text_figure
from .steps import span_text

HEAT = 2000              # steps in the heatmap (from the page's start)
TOP = 20                 # units in a feature heatmap and in pattern-search results


def div(text: str, **kw) -> Div:
    """A Div that never typesets TeX: ``text`` must already be escaped."""
    return Div(text=text, disable_math=True, **kw)


def table(source: ColumnDataSource, columns: list[str], widths: dict[str, int] | None = None, **kw) -> DataTable:
    """Cells as plain text, numbers pre-formatted (``queries.fmt``): sorting them as strings would
    mislead, so the rows keep the order the analysis ranked them in. ``widths``: pixels for some
    columns (the rest 90): the table then scrolls sideways rather than squeeze a unit's name."""
    widths = widths or {}
    return DataTable(source=source, sortable=False, autosize_mode="none" if widths else "force_fit",
                     columns=[TableColumn(field=c, title=c, formatter=StringFormatter(), width=widths.get(c, 90))
                              for c in columns], **kw)


def text_width(strings, lo: int = 60, hi: int = 2400) -> int:
    """Pixels a table column needs for the longest of ``strings`` (a wide character counts two)."""
    longest = sorted({str(t) for t in strings}, key=len)[-50:]       # the widest is among the longest
    most = max((sum(cell_columns(ch) for ch in t) for t in longest), default=0)
    return int(min(max(7 * most + 24, lo), hi))


def on_row_click(source: ColumnDataSource, data, sel) -> None:
    """Clicking a row whose ``unit`` the Run holds selects that unit."""
    def pick(attr, old, new):
        found = new and data.unit(source.data["unit"][new[0]])
        if found:
            sel.set(key=found[0], index=found[1])
    source.selected.on_change("indices", pick)


class Controls:
    """Key, unit index, document and page: widgets that mirror the selection and write it."""

    def __init__(self, data, sel):
        self.data, self.sel = data, sel
        self.key = Select(title="key", value=sel.key, options=data.keys, name="unit_key", width=180)
        self.index = Spinner(title="unit index", low=0, high=data.units[sel.key] - 1, step=1, value=sel.index,
                             name="unit_index", width=110)
        self.document = DocumentPicker(data.docs, sel.document, self._pick)
        self.start = Spinner(title="window start", low=0, high=max(data.steps - 1, 0),
                             step=max(data.window // 2, 1), value=sel.start, name="window_start", width=130)
        prev, nxt = Button(label="\u25c0 page", width=80), Button(label="page \u25b6", width=80)
        prev.on_click(lambda: sel.set(**data.turn(sel, -1)))
        nxt.on_click(lambda: sel.set(**data.turn(sel, +1)))
        self.key.on_change("value", lambda a, o, n: sel.set(key=n, index=min(sel.index, data.units[n] - 1)))
        self.index.on_change("value", lambda a, o, n: sel.set(index=int(min(max(n or 0, 0), data.units[sel.key] - 1))))
        self.start.on_change("value", lambda a, o, n: sel.set(**data.at(int(n or 0))))
        self.root = row(self.key, self.index, self.document.root, self.start, column(div("", height=12), row(prev, nxt)))
        sel.watch(self.update)

    def _pick(self, document: int) -> None:
        if document != self.sel.document:
            self.sel.set(**self.data.at(int(self.data.docs.step_start[document])))

    def update(self, changed: set[str]) -> None:
        self.index.high = self.data.units[self.sel.key] - 1
        self.key.value, self.index.value, self.start.value = self.sel.key, self.sel.index, self.sel.start
        self.document.show(self.sel.document)


class TextView:
    """The page of text coloured by the selected unit, and the info line above it."""

    def __init__(self, data, sel):
        self.data, self.sel = data, sel
        page = self._cells()
        self.half = page.half
        self.source = ColumnDataSource(page.cells, name="text_source")
        self.lines = ColumnDataSource(page.lines, name="lines_source")
        self.wide = ColumnDataSource(page.wide, name="wide_source")
        self.info = div("", name="unit_info", width=700)
        self.plot = text_figure(self.source, self.lines, wide_source=self.wide, title=str(data.run.path.name),
                                loss=q.loss_name(data.run))
        self._info()
        sel.watch(self.update)

    def _cells(self) -> q.TextPage:
        return q.text_cells(self.data.run, self.data.docs, self.sel.document, self.sel.key, self.sel.index,
                            *self.data.span(self.sel))

    def update(self, changed: set[str]) -> None:
        if "start" in changed or "document" in changed:
            self.source.selected.indices = []
            page = self._cells()
            self.half = page.half
            self.source.data, self.lines.data, self.wide.data = page.cells, page.lines, page.wide
            fit(self.plot, page.cells, len(page.lines["y"]))
        elif changed & {"key", "index"}:
            columns, self.half = q.recolour(self.data.run, self.sel.key, self.sel.index, *self.data.span(self.sel),
                                            self.source.data["step"])
            self.source.data.update(columns)               # two columns go out, the layout stays
        self._info()

    def steps(self, indices: list[int]) -> tuple[int, int] | None:
        """The steps ``[a, b)`` that the selected cells cover, or None when they cover none."""
        steps = [int(self.source.data["step"][i]) for i in indices]
        steps = [t for t in steps if t >= 0]
        return (min(steps), max(steps) + 1) if steps else None

    def _info(self) -> None:
        s, e = self.data.span(self.sel)
        where = q.page_label(self.data.word, s, e, self.data.steps, self.data.docs, self.sel.document)
        self.info.text = q.unit_info(self.data.neurons, self.sel.unit, where, self.half)


class HeatmapView:
    """Units x time over the page: the whole selected key, or the top units for the selected feature."""

    def __init__(self, data, sel):
        self.data, self.sel = data, sel
        modes = ["whole key"] + (["top units for feature"] if data.neurons is not None else [])
        self.mode = Select(title="heatmap", value=modes[-1], options=modes, name="heat_mode", width=220)
        self.plot, self.source, self.mapper = heatmap_figure(np.zeros((1, 1)), ["-"], 0, axis=data.axis)
        self.mode.on_change("value", lambda a, o, n: self.update({"mode"}))
        self.root = column(self.mode, self.plot)
        self.update({"start"})
        sel.watch(self.update)

    def update(self, changed: set[str]) -> None:
        whole = self.mode.value == "whole key"
        if not changed & ({"start", "document", "mode"} | ({"key"} if whole else {"feature"})):
            return
        s, e = self.data.span(self.sel)
        e = min(e, s + HEAT)
        units = ([f"{self.sel.key}:{i}" for i in range(self.data.units[self.sel.key])] if whole
                 else [u for u in q.top_units(self.data.neurons, self.sel.feature, TOP) if self.data.unit(u)])
        set_heatmap(self.plot, self.source, self.mapper, q.heat_matrix(self.data.run, units, s, e), units or ["-"], s)
        what = (f"{len(units)} units of {self.sel.key}" if whole
                else f"top {len(units)} units for {self.sel.feature} (pick the feature in the neurons tab)")
        self.plot.title.text.text = f"{what}, {self.data.word} {s:,}-{e:,}"      # a PlainText: never typeset


class NeuronView:
    """The neuron table for the selected feature; a click selects the row's unit."""

    def __init__(self, data, sel):
        if data.neurons is None:
            self.root = div(q.missing_note("neuron table", f"rnnscope analyze {data.run.path}", data.why["neurons"]),
                            width=900)
            return
        self.data, self.sel = data, sel
        self.feature = Select(title="feature", value=sel.feature, options=data.features, name="feature_filter")
        self.source = ColumnDataSource(q.neuron_rows(data.neurons, sel.feature), name="neuron_rows")
        widths = {"unit": text_width(data.neurons["unit"]), "feature": text_width(data.features)}
        grid = table(self.source, q.NEURON_COLUMNS, widths, name="neuron_table", width=900, height=420)
        self.feature.on_change("value", lambda a, o, n: sel.set(feature=n))
        on_row_click(self.source, data, sel)
        self.root = column(self.feature, grid)
        sel.watch(self.update)

    def update(self, changed: set[str]) -> None:
        if "feature" in changed:
            self.feature.value = self.sel.feature
            self.source.data = q.neuron_rows(self.data.neurons, self.sel.feature)


class PatternView:
    """Select a span of the text (box select): the units on inside it and off around it."""

    def __init__(self, data, sel, text: TextView):
        self.data, self.sel, self.text = data, sel, text
        self.info = div("Select a span of the text (box select) to find the units that are on inside it and off "
                        "around it.", width=900, name="pattern_info")
        self.source = ColumnDataSource({c: [] for c in ("unit", "inside", "around", "score")}, name="pattern_rows")
        grid = table(self.source, ["unit", "inside", "around", "score"], width=700, height=420, name="pattern_table")
        on_row_click(self.source, data, sel)
        text.source.selected.on_change("indices", lambda a, o, n: self.search(n))
        self.root = column(self.info, grid)
        self.search(text.source.selected.indices)      # a span selected before this tab was built

    def search(self, indices: list[int]) -> None:
        found = self.text.steps(indices) if indices else None
        if not found:
            return
        (a, b), (s, e) = found, self.data.span(self.sel)
        rows = q.pattern_rows(self.data.run, q.pattern_keys(self.data.state_keys), s, e, a, b, TOP)
        self.source.data = rows
        run = self.data.run
        word = "span" if self.data.word == "characters" else "steps"
        self.info.text = q.pattern_note(span_text(run.text, run.spans, a, b), a, b, len(rows["unit"]), word)


class ContextsView:
    """The selected unit's top and bottom contexts (``rnnscope analyze`` writes them); a click on a row
    pages the text to that step."""

    def __init__(self, data, sel):
        self.data, self.sel = data, sel
        contexts = data.tables.get("contexts")
        if contexts is None:
            self.root = div(q.missing_note("top contexts", f"rnnscope analyze {data.run.path}",
                                           data.why.get("contexts")), width=900)
            return
        self.docs = data.docs if len(data.docs) > 1 else None        # which document each window is in
        self.source = ColumnDataSource(q.context_rows(contexts, sel.unit, self.docs), name="context_rows")
        widths = {"side": 60, "rank": 50, "context": text_width(contexts["context"], hi=1600) + 14,   # + brackets
                  "document": text_width(data.docs.names[:2000], hi=400) + 40}
        columns = q.CONTEXT_COLUMNS + (["document"] if self.docs is not None else [])
        grid = table(self.source, columns, widths, name="context_table", width=900, height=420)
        self.source.selected.on_change("indices", lambda a, o, n: self._jump(n))
        self.root = grid
        sel.watch(self.update)

    def _jump(self, rows: list[int]) -> None:
        if rows:
            step = int(self.source.data["step"][rows[0]])
            first = int(self.data.docs.step_start[self.data.docs.of(step)])
            self.sel.set(**self.data.at(max(first, step - self.data.window // 2)))

    def update(self, changed: set[str]) -> None:
        if changed & {"key", "index"}:
            self.source.data = q.context_rows(self.data.tables["contexts"], self.sel.unit, self.docs)
