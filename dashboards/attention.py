"""Where a decoder looks: a Run's attention weights over the source, one document at a time.

``document_attention`` reads a document's rows ``[steps, source]`` and labels both axes (each step by
its text, each source position by its text when the documents carried a ``source``, else by its
index); ``attention_figure`` draws them as a steps x source heatmap, the first step on top, on one
0..max scale (rows are weights: they share a scale, unlike units); ``source_html`` shades the source
by one step's weights. ``AttentionView`` is the dashboard's tab: pick a module and a decoder step
(the spinner, or a click on the heatmap) and the source is shaded by that step's weights.
"""
from __future__ import annotations

import numpy as np
from bokeh.events import Tap
from bokeh.layouts import column, row
from bokeh.models import ColorBar, ColumnDataSource, FixedTicker, LinearColorMapper, Range1d, Select, Spinner
from bokeh.palettes import Blues256
from bokeh.plotting import figure

from rnnscope.errors import RnnscopeError

from .figures import plain, shown_text
from .queries import esc
from .views import div

PALETTE = Blues256[::-1]        # light (0) to dark (the most weight)
LABELLED = 60                   # axis positions labelled one by one up to this many (past it they overlap)
CELL = 14                       # pixels per step and per source position, within the figure's bounds
MAX_STEPS = 20000               # decoder steps one exported picture holds (the export's own limit)
VIEW_STEPS = 2000               # decoder steps the tab draws (a browser lays out an image this tall at once)


def document_attention(run, name: str, d: int, steps: int | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """``(weights [steps, source] float32, step labels, source labels)`` of document ``d`` (its first
    ``steps`` steps when given)."""
    weights = np.asarray(run.attention(name)[d][:steps], np.float32)
    a = int(run.step_bounds[d, 0])
    b = a + len(weights)
    steps = [f"{i} {shown_text(t)}" if t else f"{i}" for i, t in enumerate(run.tokens(a, b))]
    source = run.source.tokens(d) if run.source is not None else None
    labels = [shown_text(t) for t in source] if source is not None else [str(i) for i in range(weights.shape[1])]
    return weights, steps, labels[: weights.shape[1]]


def source_html(labels: list[str], weights: np.ndarray) -> str:
    """The source positions as escaped spans shaded by ``weights [source]`` (the darkest the step's
    largest weight), each titled with its weight; NaN (past a shorter row) unshaded."""
    top = np.nanmax(weights) if np.isfinite(weights).any() else 1.0
    parts = []
    for label, w in zip(labels, weights):
        alpha = float(w / top) if np.isfinite(w) and top > 0 else 0.0
        ink = "#fff" if alpha > 0.55 else "#000"
        parts.append(f'<span class="attn" title="{float(w):.4f}" style="background: rgba(8, 69, 148, {alpha:.3f}); '
                     f'color: {ink}; padding: 2px 3px; margin: 1px; font-family: monospace; white-space: pre">'
                     f"{esc(label) or '&nbsp;'}</span>")
    return "<div>" + "".join(parts) + "</div>"


def _ticks(axis, labels: list[str], flip: bool) -> None:
    n = len(labels)
    at = [(n - 1 - j if flip else j) + 0.5 for j in range(n)] if n <= LABELLED else []
    axis.ticker = FixedTicker(ticks=at)
    axis.major_label_overrides = {t: plain(lab[:24]) for t, lab in zip(at, labels)}


def attention_figure(weights: np.ndarray, steps: list[str], source: list[str], *, title: str = "",
                     name: str = "attention_heatmap"):
    """``weights [steps, source]`` as an image, step 0 on top; returns ``(figure, image source, mapper,
    marker source)`` (the marker outlines one step's row; the dashboard moves it)."""
    mapper = LinearColorMapper(palette=PALETTE, low=0, high=1, nan_color="#eeeeee")
    image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="attention_image")
    marker = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": []}, name="attention_marker")
    p = figure(name=name, x_range=Range1d(0, 1), y_range=Range1d(0, 1), tools="pan,wheel_zoom,reset",
               toolbar_location="above")
    p.title.text = plain(title)
    p.image(image="image", x="x", y="y", dw="dw", dh="dh", source=image, color_mapper=mapper)
    p.quad(left="left", right="right", bottom="bottom", top="top", source=marker, fill_alpha=0,
           line_color="#d62728", line_width=2)
    p.xaxis.axis_label, p.yaxis.axis_label = "source position", "decoder step"
    p.xaxis.major_label_orientation = 0.9
    p.add_layout(ColorBar(color_mapper=mapper, width=12), "right")
    set_attention(p, image, mapper, weights, steps, source)
    return p, image, mapper, marker


def set_attention(p, image, mapper, weights: np.ndarray, steps: list[str], source: list[str]) -> None:
    """Replace the heatmap's rows in place (a new document or module)."""
    n, m = weights.shape
    top = float(np.nanmax(weights)) if np.isfinite(weights).any() else 1.0
    mapper.update(low=0, high=top if top > 0 else 1.0)
    image.data = {"image": [np.ascontiguousarray(weights[::-1], np.float32)], "x": [0], "y": [0], "dw": [m],
                  "dh": [n]}
    p.x_range.update(start=0, end=m)
    p.y_range.update(start=0, end=n)
    p.width, p.height = int(np.clip(CELL * m + 260, 420, 1400)), int(np.clip(CELL * n + 140, 220, 900))
    _ticks(p.xaxis, source, flip=False)
    _ticks(p.yaxis, steps, flip=True)


class AttentionView:
    """The attention tab over ``sel.document``: module, decoder step, the shaded source, the heatmap."""

    def __init__(self, data, sel):
        self.data, self.sel, names = data, sel, data.run.attention_names()
        if not names:
            raise RnnscopeError(f"{data.run.path} holds no attention", "record with --attention NAME")
        self.module = Select(title="attention module", value=names[0], options=names, name="attention_module",
                             width=220)
        self.step = Spinner(title="decoder step", low=0, high=0, step=1, value=0, name="attention_step", width=120)
        self.info = div("", name="attention_info", width=900)
        self.source = div("", name="attention_source", width=900)
        self._load()
        self.fig, self.image, self.mapper, self.marker = attention_figure(self.weights, self.steps, self.labels)
        self._show()
        self.module.on_change("value", lambda a, o, n: self._reload())
        self.step.on_change("value", lambda a, o, n: self._show())
        self.fig.on_event(Tap, self._tap)
        sel.watch(lambda changed: self._reload() if "document" in changed else None)
        self.root = column(row(self.module, self.step), self.info, self.source, self.fig)

    def _load(self) -> None:
        self.weights, self.steps, self.labels = document_attention(self.data.run, self.module.value,
                                                                   self.sel.document, VIEW_STEPS)
        total = int(np.diff(self.data.run.step_bounds[self.sel.document])[0])
        self.more = f" (the first {VIEW_STEPS:,} of the document's {total:,} steps)" if total > VIEW_STEPS else ""
        self.step.update(high=len(self.weights) - 1, value=min(int(self.step.value or 0), len(self.weights) - 1))

    def _reload(self) -> None:
        self._load()
        set_attention(self.fig, self.image, self.mapper, self.weights, self.steps, self.labels)
        self._show()

    def _tap(self, event) -> None:
        if event.y is not None and 0 <= event.y < len(self.weights):
            self.step.value = len(self.weights) - 1 - int(event.y)     # the first step is drawn on top

    def _show(self) -> None:
        t = int(min(max(self.step.value or 0, 0), len(self.weights) - 1))
        row_ = self.weights[t]
        n, m = self.weights.shape
        self.marker.data = {"left": [0], "right": [m], "bottom": [n - 1 - t], "top": [n - t]}
        look = int(np.nanargmax(row_)) if np.isfinite(row_).any() else -1
        self.info.text = (f"<p>decoder step <b>{esc(self.steps[t])}</b> looks most at source position "
                          f"<b>{look} {esc(self.labels[look]) if look >= 0 else ''}</b> "
                          f"(weight {float(row_[look]) if look >= 0 else float('nan'):.3f}){self.more}</p>")
        self.source.text = source_html(self.labels, row_)


def run_attention_figure(run, name: str, document=None):
    """The steps x source heatmap of ``name`` over one document of ``run`` (a name or index; default
    the first), titled with the module and the document (``rnnscope export --attention``)."""
    from .steps import Documents
    d = 0 if document is None else Documents(run.documents).find(document)
    total = int(np.diff(run.step_bounds[d])[0])
    if total > MAX_STEPS:
        raise RnnscopeError(f"document {d} has {total:,} steps, more than one picture holds ({MAX_STEPS:,})",
                            "export another --document, or read run.attention(name)[d] in Python")
    weights, steps, source = document_attention(run, name, d)
    where = f", document {shown_text(str(run.documents['name'].iloc[d]))}" if len(run.documents) > 1 else ""
    over = "source" if run.source is not None else "source positions"
    title = f"attention of {name}{where}: {len(steps)} steps x {len(source)} {over}"
    fig = attention_figure(weights, steps, source, title=title)[0]
    fig.width = int(min(max(fig.width, 7 * len(title) + 120), 1400))      # the title is never cut
    fig.toolbar_location = None                                             # a picture, not a control
    return fig
