"""The figures of a watch log, drawn from ``ColumnDataSource``s shaped by ``watch_data``: the live page
streams rows into the same sources the PNG exporter fills once.

Labels that may hold the log's strings (layer and state keys come from the log: untrusted) are legend
labels, drawn on the canvas as text, or ``PlainText`` titles and axis labels: Bokeh typesets neither
as TeX. Norms are drawn on log scales: they span orders of magnitude when a gradient vanishes or explodes.
"""
from __future__ import annotations

from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LogColorMapper, LogTicker
from bokeh.palettes import Category10, Viridis256
from bokeh.plotting import figure

from .figures import plain
from . import watch_data as wd
from .watch_data import GATES

WIDTH = 800             # the plot frame's width: frames align above each other whatever the legends
MARGIN = 80             # the room left of every frame, for the widest y-axis labels
DASHES = ("solid", "dashed", "dotted", "dotdash", "dashdot")
GATE_COLOURS = {"i": "#1f77b4", "f": "#d62728", "o": "#2ca02c", "r": "#9467bd", "z": "#ff7f0e", "h": "#8c564b"}


def _titled(fig, title: str, x: str, y: str):
    fig.title.text = plain(title)
    fig.xaxis.axis_label, fig.yaxis.axis_label = plain(x), plain(y)
    return fig


def _figure(name: str, height: int, width: int, tools: str, **kw):
    return figure(frame_width=width, min_border_left=MARGIN, height=height, tools=tools, name=name, **kw)


def _legend_outside(fig) -> None:
    """Beside the plot, not over the lines (one item per layer and gate outgrows any corner); a click
    on an item hides its line."""
    fig.legend.click_policy = "hide"
    fig.add_layout(fig.legend[0], "right")


def loss_figure(loss: ColumnDataSource, clips: ColumnDataSource, flags: ColumnDataSource, width: int = WIDTH):
    """The loss per watched step; clipped steps as red triangles, flagged steps (non-finite loss or
    gradient, a step that went backwards) as black crosses at the last finite loss."""
    p = _figure("loss_figure", 260, width, tools="xpan,xwheel_zoom,box_zoom,reset")
    p.line("step", "loss", source=loss, color="#1f77b4", legend_label="loss")
    clipped = p.scatter("step", "loss", source=clips, marker="triangle", size=9, color="#d62728", legend_label="clipped")
    flagged = p.scatter("step", "y", source=flags, marker="x", size=12, line_width=2, color="black",
                        legend_label="flagged")
    p.add_tools(HoverTool(renderers=[flagged], tooltips=[("step", "@step"), ("flags", "@flags")]))
    p.add_tools(HoverTool(renderers=[clipped], tooltips=[("step", "@step"), ("clipped steps since the last watched", "@clips")]))
    _legend_outside(p)
    return _titled(p, "training loss per watched step", "training step", "loss")


def norm_figure(loss: ColumnDataSource, clips: ColumnDataSource, x_range, width: int = WIDTH):
    """The global gradient norm before and after clipping (log scale), clipped steps marked."""
    p = _figure("norm_figure", 220, width, x_range=x_range, y_axis_type="log", tools="xpan,xwheel_zoom,reset")
    p.line("step", "grad_norm", source=loss, color="#d62728", legend_label="before clipping")
    p.line("step", "grad_norm_after", source=loss, color="#2ca02c", line_dash="dashed", legend_label="after clipping")
    p.scatter("step", "grad_norm", source=clips, marker="triangle", size=8, color="#d62728")
    _legend_outside(p)
    return _titled(p, "global gradient norm (log scale)", "training step", "||grad||")


def half_life_figure(layers: dict[str, ColumnDataSource], x_range, width: int = WIDTH):
    """Per layer: how many timesteps back the gradient of the last step's loss halves, against the
    training step (a gap where it never halved within the sequence)."""
    p = _figure("half_life_figure", 260, width, x_range=x_range, tools="xpan,xwheel_zoom,reset")
    for i, (layer, src) in enumerate(layers.items()):
        colour = Category10[10][i % 10]
        p.line("step", "half_life", source=src, color=colour, legend_label=layer)
        p.scatter("step", "half_life", source=src, color=colour, size=4, legend_label=layer)
    _legend_outside(p)
    return _titled(p, "half-life of the gradient through time", "training step", "half-life (timesteps)")


def saturation_figure(layers: dict[str, ColumnDataSource], families: dict[str, str], x_range, width: int = WIDTH):
    """The fraction of each gate's units saturated, per layer (line style) and gate kind (colour)."""
    p = _figure("saturation_figure", 260, width, x_range=x_range, y_range=(0, 1), tools="xpan,xwheel_zoom,reset")
    for i, (layer, src) in enumerate(layers.items()):
        for gate in GATES[families[layer]]:
            p.line("step", f"sat_{gate}", source=src, color=GATE_COLOURS[gate], line_dash=DASHES[i % len(DASHES)],
                   legend_label=f"{layer} {gate}")
    _legend_outside(p)
    return _titled(p, "saturated fraction per gate", "training step", "fraction saturated")


def decay_figure(decay: ColumnDataSource, low: float, high: float, x_range, width: int = WIDTH):
    """Gradient-decay norm over (lag back from the loss, training step), on a log colour scale.
    Returns the figure and its colour mapper (the live page widens the mapper's range as rows come)."""
    mapper = LogColorMapper(palette=Viridis256, low=low, high=high, nan_color="rgba(0,0,0,0)",
                            name="decay_colours")
    p = _figure("decay_figure", 300, width, x_range=x_range, tools="xpan,xwheel_zoom,box_zoom,reset")
    p.image("image", x="x", y="y", dw="dw", dh="dh", source=decay, color_mapper=mapper)
    p.add_layout(ColorBar(color_mapper=mapper, ticker=LogTicker(), width=12, title="norm"), "right")
    return _titled(p, "||dL_T / dh_(T-k)|| (1 at lag 0) against lag k and training step", "training step",
                   "lag k back from the loss (timesteps)"), mapper


class WatchViews:
    """The sources and figures of one watch log's tables, all against the training step (one shared
    x range): the live page streams into ``sources``, the exporter draws them as read."""

    def __init__(self, manifest: dict, steps, decay, layers, key: str, width: int = WIDTH):
        self.every = float(manifest.get("every") or 1)
        self.loss = ColumnDataSource(wd.loss_rows(steps), name="watch_loss")
        self.clips = ColumnDataSource(wd.clip_rows(steps), name="watch_clips")
        flags, self.last_loss = wd.flag_rows(steps)
        self.flags = ColumnDataSource(flags, name="watch_flags")
        self.layers = {k: ColumnDataSource(wd.layer_rows(layers, k), name=f"watch_layer_{i}")
                       for i, k in enumerate(wd.layer_keys(manifest))}
        images = wd.decay_images(decay, key, self.every)
        self.range = wd.norm_range(images["image"])
        self.decay = ColumnDataSource(images, name="watch_decay")
        loss = loss_figure(self.loss, self.clips, self.flags, width)
        x = loss.x_range
        self.heat, self.mapper = decay_figure(self.decay, *self.range, x, width)
        families = {k: wd.family(manifest, k) for k in self.layers}
        self.lines = [loss, norm_figure(self.loss, self.clips, x, width), half_life_figure(self.layers, x, width)]
        self.saturation = saturation_figure(self.layers, families, x, width)

    def set_range(self, low: float, high: float) -> None:
        if (low, high) != self.range:
            self.range = low, high
            self.mapper.update(low=low, high=high)
