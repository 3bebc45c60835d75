"""The dashboard's two plot views over analysis results: gradient flow and gate saturation. Like the
views in ``views.py`` they read the one ``Selection`` and write it on a click."""
from __future__ import annotations

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource
from bokeh.palettes import Category10
from bokeh.plotting import figure

from . import queries as q
from .figures import plain
from .views import div, on_row_click

GATE_COLOURS = {"i": "#1f77b4", "f": "#d62728", "o": "#2ca02c", "r": "#9467bd", "z": "#ff7f0e"}


class GradientView:
    """Per-step gradient norms over the page, and the decay curve ``analyze`` measured."""

    def __init__(self, data, sel):
        self.data, self.sel = data, sel
        path = data.run.path
        if not data.grad_keys:
            self.root = div(q.missing_note("gradient flow", f"rnnscope probe CHECKPOINT --text FILE --out {path} "
                                           "--grad --overwrite"), width=900)
            return
        colours = Category10[10]
        self.source = ColumnDataSource(q.grad_norms(data.run, data.grad_keys, *data.span(sel)), name="grad_source")
        p = figure(width=1400, height=260, title="gradient norm per step over the window (log scale)",
                   y_axis_type="log", tools="xpan,xwheel_zoom,reset", name="grad_norms")
        for i, k in enumerate(data.grad_keys):
            p.line("pos", k, source=self.source, color=colours[i % 10], legend_label=k)
        p.legend.click_policy = "hide"
        sel.watch(self.update)
        decay, lives = data.tables["grad_decay"], data.tables["half_lives"]
        if decay is None:
            self.root = column(p, div(q.missing_note("gradient decay curve", f"rnnscope analyze {path}",
                                                     data.why["grad_decay"]), width=900))
            return
        half = lives.set_index("key")["half_life"] if lives is not None else {}
        r = figure(width=900, height=320, title="||dL_t / dstate_(t-k)|| against lag k (geometric mean)",
                   y_axis_type="log", name="grad_decay")
        for i, (k, g) in enumerate(decay.groupby("key", sort=False)):
            hl = half.get(k) if k in half else None
            r.line(g["lag"], g["geo_mean"].clip(lower=1e-30), color=colours[i % 10],
                   legend_label=f"{k}: half-life {q.fmt(hl)} steps" if hl is not None else str(k))
        r.xaxis.axis_label = plain("lag k (steps)")
        self.root = column(p, r)

    def update(self, changed: set[str]) -> None:
        if changed & {"start", "document"}:
            self.source.data = q.grad_norms(self.data.run, self.data.grad_keys, *self.data.span(self.sel))


class SaturationView:
    """The fraction of steps each gate unit spends left- and right-saturated (Karpathy et al.'s
    scatter), one panel per layer; a click selects the unit."""

    def __init__(self, data, sel):
        sat = data.tables["saturation"]
        if sat is None:
            self.root = div(q.missing_note("gate saturation", f"rnnscope analyze {data.run.path}",
                                           data.why["saturation"]), width=900)
            return
        panels = []
        for layer, g in sat.groupby("layer"):
            p = figure(width=420, height=400, x_range=(0, 1), y_range=(0, 1), tools="tap,reset,hover",
                       tooltips=[("unit", "@unit")], name=f"saturation_l{len(panels)}")
            p.title.text = plain(f"layer {layer}")
            for gate, gg in g.groupby("gate"):
                src = ColumnDataSource(gg[["left", "right", "unit"]])
                p.scatter("left", "right", source=src, color=GATE_COLOURS.get(gate, "grey"), alpha=0.6, size=6,
                          legend_label=f"{gate} gate")
                on_row_click(src, data, sel)
            p.line([0, 1], [1, 0], color="grey", line_dash="dashed")
            p.xaxis.axis_label = plain("fraction left-saturated (< 0.1)")
            p.yaxis.axis_label = plain("fraction right-saturated (> 0.9)")
            panels.append(p)
        self.root = row(*panels)

