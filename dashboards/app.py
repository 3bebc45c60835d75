"""The dashboard: one Bokeh document per browser session, built from a Run and its analysis tables.

Views, wired together: the text coloured by the selected unit; the unit picker; the neuron table
(click a row to show its unit); a units x time heatmap of the window; gradient flow (per-step norms
of the window, the decay curve); gate saturation (the paper's scatter); pattern search (select a
span of text, get the units on inside it and off around it). Every change flows through
``ColumnDataSource`` updates; no figure is rebuilt after the first paint.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
from bokeh.layouts import column, row
from bokeh.models import (Button, ColumnDataSource, DataTable, Div, NumberFormatter, Select,
                          Spinner, TableColumn, TabPanel, Tabs)
from bokeh.palettes import Category10
from bokeh.plotting import figure

from rnnscope.store import read_table
from rnnscope.probe import open_run, parse_key

from .figures import colour_range, heatmap_figure, set_heatmap, shade, text_data, text_figure

WINDOW = 10000           # characters on one page of text
HEAT = 2000              # characters in the heatmap (from the window's start)
TOP = 20                 # units in a feature heatmap and in pattern-search results


def _missing(what: str, command: str) -> Div:
    return Div(text=f"<p><b>{html.escape(what)}</b>: this Run has no data for it yet. "
                    f"Run <code>{html.escape(command)}</code> to produce it.</p>", width=900)


class Dashboard:
    def __init__(self, doc, run_path, window: int = WINDOW):
        self.run = open_run(run_path)
        self.window = window
        self.text = self.run.text
        self.loss = self.run.loss
        keys = self.run.keys()
        self.state_keys = [k for k in keys if not parse_key(k)["kind"].startswith("grad_")]
        self.grad_keys = [k for k in keys if parse_key(k)["kind"].startswith("grad_")]
        self.neurons = read_table(self.run, "neurons")
        key, index = self._first_unit()
        self.key_select = Select(title="key", value=key, options=keys, name="unit_key", width=180)
        self.index_input = Spinner(title="unit index", low=0, high=self.run[key].shape[1] - 1, step=1, value=index,
                                   name="unit_index", width=110)
        self.start_input = Spinner(title="window start", low=0, high=max(len(self.text) - 1, 0), step=window // 2,
                                   value=0, name="window_start", width=130)
        prev, nxt = Button(label="\u25c0 page", width=80), Button(label="page \u25b6", width=80)
        prev.on_click(lambda: self._page(-1))
        nxt.on_click(lambda: self._page(+1))
        self.info = Div(text="", name="unit_info", width=700)
        self.half = 1.0
        cells, lines = self._window_data()
        self.text_source = ColumnDataSource(cells, name="text_source")
        self.lines_source = ColumnDataSource(lines, name="lines_source")
        self.text_plot = text_figure(self.text_source, self.lines_source, title=str(self.run.path.name))
        neurons = self._neuron_view()          # before the heatmap, which reads its feature filter
        heat, pattern = self._heatmap_view(), self._pattern_view()
        tabs = Tabs(tabs=[TabPanel(child=heat, title="heatmap"), TabPanel(child=neurons, title="neurons"),
                          TabPanel(child=self._gradient_view(), title="gradient flow"),
                          TabPanel(child=self._saturation_view(), title="gate saturation"),
                          TabPanel(child=pattern, title="pattern search")], name="views")
        for w in (self.key_select, self.index_input):
            w.on_change("value", lambda attr, old, new: self._unit_changed())
        self.start_input.on_change("value", lambda attr, old, new: self._window_changed())
        self.text_source.selected.on_change("indices", lambda attr, old, new: self._pattern(new))
        self._update_info()
        doc.add_root(column(row(self.key_select, self.index_input, self.start_input, column(Div(height=12), row(prev, nxt)),
                                self.info), self.text_plot, tabs, name="dashboard"))
        doc.title = f"rnnscope: {self.run.path.name}"

    # -- state -------------------------------------------------------------------------------
    def _first_unit(self) -> tuple[str, int]:
        if self.neurons is not None and len(self.neurons):
            best = self.neurons.dropna(subset=["strength"])
            if len(best):
                return best.iloc[0]["key"], int(best.iloc[0]["index"])
        cells = [k for k in self.state_keys if k.endswith(".c")] or self.state_keys or self.grad_keys
        return cells[-1], 0

    @property
    def key(self) -> str:
        return self.key_select.value

    @property
    def span(self) -> tuple[int, int]:
        s = int(self.start_input.value or 0)
        return s, min(len(self.text), s + self.window)

    def _values(self, s: int, e: int) -> np.ndarray:
        return np.asarray(self.run[self.key][s:e, int(self.index_input.value)], np.float64)

    def _window_data(self) -> tuple[dict, dict]:
        s, e = self.span
        values = self._values(s, e)
        self.half = colour_range(self.key, values)
        return text_data(self.text[s:e], s, values, self.loss[s:e], self.half)

    # -- reactions -------------------------------------------------------------------------------
    def _unit_changed(self) -> None:
        U = self.run[self.key].shape[1]
        self.index_input.high = U - 1
        if self.index_input.value > U - 1:
            self.index_input.value = U - 1     # fires this again
            return
        s, e = self.span
        values = self._values(s, e)
        self.half = colour_range(self.key, values)
        self.text_source.data.update(value=np.nan_to_num(values).astype(np.float32),   # two columns go out
                                     shade=shade(values, self.half))
        self._update_info()
        if self.heat_mode.value == "whole key":
            self._refresh_heatmap()

    def _window_changed(self) -> None:
        self.text_source.selected.indices = []
        self.text_source.data, self.lines_source.data = self._window_data()
        self._update_info()
        self._refresh_heatmap()
        self._refresh_gradients()

    def _page(self, step: int) -> None:
        s = int(self.start_input.value or 0) + step * self.window
        self.start_input.value = int(min(max(0, s), max(0, len(self.text) - 1)))

    def _update_info(self) -> None:
        s, e = self.span
        unit = f"{self.key}:{int(self.index_input.value)}"
        found = ""
        if self.neurons is not None:
            hit = self.neurons[self.neurons["unit"] == unit].dropna(subset=["strength"]).head(1)
            if len(hit):
                r = hit.iloc[0]
                found = (f" &middot; best feature <b>{html.escape(str(r['feature']))}</b>: "
                         f"{r['metric']} {r['heldout_score']:.3f} held out, q={r['q_value']:.2g}")
        self.info.text = (f"<b>{html.escape(unit)}</b> &middot; characters {s:,}&ndash;{e:,} of {len(self.text):,}"
                          f" &middot; colour scale &plusmn;{self.half:.3g}{found}")

    def select_unit(self, unit: str) -> None:
        key, index = unit.rsplit(":", 1)
        self.key_select.value = key
        self.index_input.value = int(index)

    # -- views -----------------------------------------------------------------------------------
    def _neuron_view(self):
        if self.neurons is None:
            return _missing("neuron table", f"rnnscope analyze {self.run.path}")
        features = list(dict.fromkeys(self.neurons["feature"]))
        self.feature_filter = Select(title="feature", value=features[0], options=features, name="feature_filter")
        cols = ["unit", "feature", "metric", "direction", "score", "heldout_score", "q_value"]
        self.table_source = ColumnDataSource(self._table_rows(features[0], cols), name="neuron_rows")
        fmt = NumberFormatter(format="0.0000")
        table = DataTable(source=self.table_source, name="neuron_table", width=900, height=420, sortable=True,
                          columns=[TableColumn(field=c, title=c, formatter=fmt) if c in ("score", "heldout_score")
                                   else TableColumn(field=c, title=c) for c in cols])
        self.feature_filter.on_change("value", lambda a, o, n: self._feature_changed(n, cols))
        self.table_source.selected.on_change("indices", lambda a, o, n: n and self.select_unit(
            self.table_source.data["unit"][n[0]]))
        return column(self.feature_filter, table)

    def _feature_changed(self, feature: str, cols: list[str]) -> None:
        self.table_source.data = self._table_rows(feature, cols)
        if self.heat_mode.value != "whole key":
            self._refresh_heatmap()

    def _table_rows(self, feature: str, cols: list[str]) -> dict:
        t = self.neurons[self.neurons["feature"] == feature].head(2000)
        return {c: t[c].to_numpy() for c in cols}

    def _heatmap_view(self):
        modes = ["whole key"] + (["top units for feature"] if self.neurons is not None else [])
        self.heat_mode = Select(title="heatmap", value=modes[-1], options=modes, name="heat_mode", width=220)
        self.heat_plot, self.heat_source, self.heat_mapper = heatmap_figure(np.zeros((1, 1)), ["-"], 0)
        self.heat_mode.on_change("value", lambda a, o, n: self._refresh_heatmap())
        self._refresh_heatmap()
        return column(self.heat_mode, self.heat_plot)

    def _heat_units(self) -> list[str]:
        if self.heat_mode.value == "whole key" or self.neurons is None:
            return [f"{self.key}:{i}" for i in range(self.run[self.key].shape[1])]
        feature = getattr(self, "feature_filter", None)
        feat = feature.value if feature is not None else self.neurons["feature"].iloc[0]
        return self.neurons[self.neurons["feature"] == feat].dropna(subset=["strength"]).head(TOP)["unit"].tolist()

    def _refresh_heatmap(self) -> None:
        s, _ = self.span
        e = min(len(self.text), s + HEAT)
        units = self._heat_units()
        rows = [np.asarray(self.run[u.rsplit(":", 1)[0]][s:e, int(u.rsplit(":", 1)[1])], np.float32) for u in units]
        matrix = np.stack(rows) if rows else np.zeros((1, max(e - s, 1)), np.float32)
        set_heatmap(self.heat_plot, self.heat_source, self.heat_mapper, matrix, units or ["-"], s)
        feature = getattr(self, "feature_filter", None)
        self.heat_plot.title.text = (f"{len(units)} units of {self.key}" if self.heat_mode.value == "whole key"
                                     else f"top {len(units)} units for {feature.value if feature else 'the feature'}"
                                     " (pick the feature in the neurons tab)") + f", characters {s:,}-{e:,}"

    def _gradient_view(self):
        if not self.grad_keys:
            return _missing("gradient flow", f"rnnscope probe CHECKPOINT --text FILE --out {self.run.path} --grad --overwrite")
        colours = Category10[10]
        self.grad_source = ColumnDataSource(self._grad_data(), name="grad_source")
        p = figure(width=1400, height=260, title="gradient norm per step over the window (log scale)",
                   y_axis_type="log", tools="xpan,xwheel_zoom,reset", name="grad_norms")
        for i, k in enumerate(self.grad_keys):
            p.line("pos", k, source=self.grad_source, color=colours[i % 10], legend_label=k)
        p.legend.click_policy = "hide"
        decay, lives = read_table(self.run, "grad_decay"), read_table(self.run, "half_lives")
        if decay is None:
            return column(p, _missing("gradient decay curve", f"rnnscope analyze {self.run.path}"))
        q = figure(width=900, height=320, title="||dL_t / dstate_(t-k)|| against lag k (geometric mean)",
                   y_axis_type="log", name="grad_decay")
        for i, (k, g) in enumerate(decay.groupby("key", sort=False)):
            hl = lives.set_index("key")["half_life"].get(k) if lives is not None else None
            q.line(g["lag"], g["geo_mean"].clip(lower=1e-30), color=colours[i % 10],
                   legend_label=f"{k}: half-life {hl:.1f} steps" if hl is not None else k)
        q.xaxis.axis_label = "lag k (steps)"
        return column(p, q)

    def _grad_data(self) -> dict:
        s, e = self.span
        data = {"pos": np.arange(s, e)}
        for k in self.grad_keys:
            x = np.asarray(self.run[k][s:e], np.float64)
            data[k] = np.maximum(np.sqrt((x * x).sum(1)), 1e-30)
        return data

    def _refresh_gradients(self) -> None:
        if self.grad_keys:
            self.grad_source.data = self._grad_data()

    def _saturation_view(self):
        sat = read_table(self.run, "saturation")
        if sat is None:
            return _missing("gate saturation", f"rnnscope analyze {self.run.path}")
        colours = {"i": "#1f77b4", "f": "#d62728", "o": "#2ca02c", "r": "#9467bd", "z": "#ff7f0e"}
        panels = []
        for layer, g in sat.groupby("layer"):
            p = figure(width=420, height=400, title=f"layer {layer}", x_range=(0, 1), y_range=(0, 1),
                       tools="tap,reset,hover", tooltips=[("unit", "@unit")], name=f"saturation_l{layer}")
            for gate, gg in g.groupby("gate"):
                src = ColumnDataSource(gg[["left", "right", "unit"]])
                p.scatter("left", "right", source=src, color=colours.get(gate, "grey"), alpha=0.6, size=6,
                          legend_label=f"{gate} gate")
                src.selected.on_change("indices", lambda a, o, n, src=src: n and self.select_unit(src.data["unit"][n[0]]))
            p.line([0, 1], [1, 0], color="grey", line_dash="dashed")
            p.xaxis.axis_label, p.yaxis.axis_label = "fraction left-saturated (< 0.1)", "fraction right-saturated (> 0.9)"
            panels.append(p)
        return row(*panels)

    def _pattern_view(self):
        self.pattern_info = Div(text="Select a span of the text (box select) to find the units that are on "
                                     "inside it and off around it.", width=900, name="pattern_info")
        self.pattern_source = ColumnDataSource({"unit": [], "inside": [], "around": [], "score": []},
                                               name="pattern_rows")
        fmt = NumberFormatter(format="0.000")
        table = DataTable(source=self.pattern_source, width=700, height=420, name="pattern_table",
                          columns=[TableColumn(field="unit", title="unit")] +
                                  [TableColumn(field=c, title=c, formatter=fmt) for c in ("inside", "around", "score")])
        self.pattern_source.selected.on_change("indices", lambda a, o, n: n and self.select_unit(
            self.pattern_source.data["unit"][n[0]]))
        return column(self.pattern_info, table)

    def _pattern(self, indices: list[int]) -> None:
        """LSTMVis-style: mean inside the span minus mean in equal stretches either side, in units of
        the unit's standard deviation over the window, for every unit of the h and c keys."""
        if not indices:
            return
        s, e = self.span
        a, b = s + min(indices), s + max(indices) + 1
        n = b - a
        lo, hi = max(s, a - n), min(e, b + n)
        rows = []
        for key in [k for k in self.state_keys if parse_key(k)["kind"] in ("h", "c")] or self.state_keys:
            x = np.asarray(self.run[key][lo:hi], np.float64)
            inside = x[a - lo:b - lo].mean(0)
            around = np.concatenate([x[:a - lo], x[b - lo:]]).mean(0) if hi - lo > n else np.zeros(x.shape[1])
            sd = np.asarray(self.run[key][s:e], np.float64).std(0) + 1e-6
            score = (inside - around) / sd
            rows.append(pd.DataFrame({"unit": [f"{key}:{i}" for i in range(x.shape[1])], "inside": inside,
                                      "around": around, "score": score}))
        top = pd.concat(rows).nlargest(TOP, "score")
        self.pattern_source.data = {c: top[c].to_numpy() for c in top.columns}
        shown = self.text[a:b] if n <= 80 else self.text[a:a + 77] + "..."
        self.pattern_info.text = (f"span {a:,}&ndash;{b:,} (<code>{html.escape(shown)}</code>): "
                                  f"top {len(top)} units on inside it, off around it")


def make_document(doc, run_path, window: int = WINDOW) -> Dashboard:
    return Dashboard(doc, run_path, window)
