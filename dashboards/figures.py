"""The figures shared by the dashboard and the exporters: the text coloured by a unit (as in the
figures of Karpathy, Johnson & Fei-Fei 2015), and a units x time heatmap.

Text is drawn as Bokeh ``text`` glyphs on a canvas, one per character, over ``rect`` glyphs coloured
through a ``LinearColorMapper``: the characters never become HTML, so a text holding ``<script>`` is
drawn, never run, and changing the unit changes one column of a ``ColumnDataSource``. Control and
bidi characters are drawn as ``⟨U+202E⟩`` so what is drawn is what is stored; every label that may
hold a Run's strings is ``PlainText``, which Bokeh never typesets as TeX.
"""
from __future__ import annotations

import warnings
from unicodedata import east_asian_width

import numpy as np
from bokeh.models import (ColorBar, ColumnDataSource, FixedTicker, HoverTool, LinearColorMapper, PlainText,
                          Range1d, Text, WheelPanTool)
from bokeh.palettes import RdBu11
from bokeh.plotting import figure

from rnnscope.errors import hidden
from rnnscope.store import KEY, parse_key

TAB, WRAP = 8, 160
BOUNDED = {"h", "g", "n", "i", "f", "o", "r", "z"}       # tanh or sigmoid: fixed -1..1
INK = "#111111"                   # the text colour, on every cell
NAN_COLOUR = "#f0e442"            # yellow: on neither arm of the red-white-blue scale, and legible under INK


def luminance(colour: str) -> float:
    """WCAG relative luminance of ``#rrggbb``."""
    c = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two colours (1..21; 4.5 is the minimum for body text)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _legible(colour: str, ratio: float = 5.0) -> str:
    """``colour`` mixed with white just enough that INK on it reaches ``ratio``: RdBu's darkest ends
    (navy, maroon) under black text read at 1.6:1; capped, they keep their hue and read at >= 5."""
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], np.float64)
    for t in np.linspace(0, 1, 101):
        mixed = "#" + "".join(f"{int(round(v)):02x}" for v in rgb + (255 - rgb) * t)
        if contrast(mixed, INK) >= ratio:
            return mixed
    return "#ffffff"


PALETTE = tuple(_legible(c) for c in reversed(RdBu11))     # blue negative, white 0, red positive
SHOWN = {"\n": "\u21b5", "\t": " "}


def shown(ch: str) -> str:
    """What is drawn for one stored character (``⟨U+202E⟩`` for a control or bidi character: the one
    policy of ``rnnscope.errors.hidden``, which would otherwise reorder or hide text)."""
    if ch in SHOWN:
        return SHOWN[ch]
    return f"\u27e8U+{ord(ch):04X}\u27e9" if hidden(ch) else ch


class _ShowTable(dict):
    """``str.translate``'s table of ``shown``: filled as characters are met (the hidden ones are
    categories, not a list), so each code point is decided once."""

    def __missing__(self, cp: int) -> str:
        self[cp] = shown(chr(cp))
        return self[cp]


SHOW_TABLE = _ShowTable()


def shown_text(text: str) -> str:
    """``shown`` of every character of ``text`` (one ``str.translate``: a page's 10,000 tokens in ms)."""
    return text.translate(SHOW_TABLE)


def plain(text: str) -> PlainText:
    """A label Bokeh draws as written: a string holding ``$$`` would otherwise be typeset as TeX."""
    return PlainText(text=text)
COL, ROW = 9, 20                  # pixels per column and per line of text
FONT, ADVANCE = "DejaVu Sans Mono, Liberation Mono, monospace", 0.6021   # advance width in em
# Wide characters are drawn one glyph each, centred on their two columns, so whatever advance the font
# gives them (a CJK font's 1 em is 1.66 of our columns) neither they nor the text after them drift.
FIRST_WIDE = "\u1100"             # no character before Hangul Jamo is wide: ASCII skips the lookup
MIN_ROWS = 6                      # a one-line document's colour bar still has room for its labels
WIDE_FONT = "Noto Sans Mono CJK SC, Noto Sans CJK SC, Noto Sans CJK JP, Droid Sans Fallback, sans-serif"


def columns(written: str) -> int:
    """Columns one drawn entry takes: 2 for an East Asian wide or full-width character (Unicode's
    ``W`` and ``F``: ideographs, kana, hangul, full-width punctuation), else one per character."""
    return 2 if len(written) == 1 and east_asian_width(written) in "WF" else len(written)


def layout(drawn) -> tuple[dict, dict, dict]:
    """Where each cell sits and what is written there. ``drawn``: the page's characters in order (a
    string, or a list whose one-character entries are characters of the text and whose longer entries
    are the marks of steps without text, ``⟨id 3⟩``, drawn as they are).

    Returns ``cells`` (one per entry: ``x`` the centre of its cell, ``w`` its width in columns, a tab
    spanning to the next stop and a wide character two, ``y`` minus the line number, ``char`` as
    shown), ``lines`` (one per displayed line: ``y`` and the ``line`` string, drawn as one glyph: one
    canvas call per line instead of per character keeps a repaint of 10,000 characters cheap; a wide
    character is two spaces there) and ``wide`` (one per wide character: ``x``, ``y``, ``char``, drawn
    centred on its cell). A line wraps before an entry that would pass WRAP columns."""
    xs, ws, ys, chars = [], [], [], []
    wide = {"x": [], "y": [], "char": []}
    rows: list[list[str]] = [[]]
    col = row = 0
    for ch in drawn:
        written = shown(ch) if len(ch) == 1 else ch
        if ch == "\t":
            w = TAB - col % TAB
        else:
            w = columns(written) if ch >= FIRST_WIDE else len(written)
        if col and col + w > WRAP:
            col, row = 0, row + 1
            rows.append([])
        x = col + (w - 1) / 2
        xs.append(x)
        ws.append(w)
        ys.append(-row)
        chars.append(written)
        if ch == "\t" or w == 2 and len(written) == 1:
            rows[-1].append(" " * w)
            if ch != "\t":
                for col_, v in zip(wide.values(), (x, -row, written)):
                    col_.append(v)
        else:
            rows[-1].append(written)
        if ch == "\n":
            col, row = 0, row + 1
            rows.append([])
        else:
            col += w
    cells = {"x": np.asarray(xs, np.float64), "w": np.asarray(ws, np.float64), "y": np.asarray(ys, np.float64),
             "char": chars}
    lines = {"x": np.full(len(rows), -0.5), "y": -np.arange(len(rows), dtype=np.float64),
             "line": ["".join(r) for r in rows]}
    return cells, lines, {"x": np.asarray(wide["x"], np.float64), "y": np.asarray(wide["y"], np.float64),
                          "char": wide["char"]}


def colour_range(key: str, values: np.ndarray) -> float:
    """Half-width of the symmetric colour scale: 1 for bounded states and gates, else the 99th
    percentile of |value| (cell states reach 100 and more; gradients are tiny)."""
    if parse_key(key)["kind"] in BOUNDED:
        return 1.0
    v = np.abs(np.asarray(values, np.float64))
    v = v[np.isfinite(v)]
    top = float(np.quantile(v, 0.99)) if len(v) else 1.0
    return top if top > 0 else 1.0


def row_ranges(key: str, rows: np.ndarray) -> np.ndarray:
    """``colour_range`` of each row of ``rows [units, time]`` of one key, float32 ``[units]``; a row
    that is not a state key's (a feature's own track) on the percentile scale."""
    m = KEY.match(key)
    if m and m["kind"] in BOUNDED:
        return np.ones(len(rows), np.float32)
    if not rows.shape[1]:
        return np.ones(len(rows), np.float32)
    with warnings.catch_warnings():                     # a row of NaN only: its range is 1, as below
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.nanquantile(np.abs(np.where(np.isfinite(rows), rows, np.nan)).astype(np.float64), 0.99, axis=1)
    return np.where(np.isfinite(top) & (top > 0), top, 1.0).astype(np.float32)


def fit(p, cells: dict, n_lines: int, lines: int = 40) -> None:
    """Size the text plot's frame to a page: one column exactly COL pixels (the monospace font's
    advance), ``lines`` lines at most and MIN_ROWS at least, scrolled to the page's top."""
    cols = max(int(np.max(cells["x"] + cells["w"] / 2)) + 1 if len(cells["x"]) else 0, 80)
    rows = max(min(lines, n_lines), MIN_ROWS)
    p.frame_width, p.frame_height = COL * cols, ROW * rows
    p.x_range.update(start=-0.5, end=cols - 0.5)
    p.y_range.update(start=-rows + 0.5, end=0.5)


def text_figure(source: ColumnDataSource, lines_source: ColumnDataSource, *, wide_source=None,
                half: float | None = None, lines: int = 40, title: str = "", loss: str | None = "loss") -> figure:
    """The coloured text: ``source`` holds the cells (``x w y char step pos token id value shade alpha
    edge loss``, see ``text_data``), ``lines_source`` the line strings drawn over them and
    ``wide_source`` (``layout``'s ``wide``) the wide characters, one glyph each. Shows ``lines``
    lines at a time and scrolls with the mouse wheel. The plot's frame is sized so that one column is
    exactly COL pixels and the monospace font's advance matches it; a new unit changes only the cells'
    ``value`` and ``shade`` columns, so the browser does not lay the text out again. Cells are
    coloured by ``shade`` (the value over the unit's colour range, -1..1) through a fixed mapper: a
    new scale never relayouts the colour bar, whose ends read the scale ``half`` when given, else
    "-max" / "+max" (the dashboard prints the scale beside the unit). Characters no step covers are
    left uncoloured (``alpha`` 0); the marks of steps without text are outlined (``edge`` 1). The
    hover names the loss ``loss`` (None: the Run has no loss, and the hover no loss line)."""
    mapper = LinearColorMapper(palette=PALETTE, low=-1, high=1, nan_color=NAN_COLOUR)
    p = figure(name="text_plot", x_range=Range1d(0, 1), y_range=Range1d(0, 1), x_axis_type=None, y_axis_type=None,
               tools="pan,box_select,tap,reset", toolbar_location="above", output_backend="canvas",
               min_border_left=4, min_border_right=4)        # no axes: ten fewer models to build and send
    fit(p, source.data, len(lines_source.data["y"]), lines)
    p.title.text = plain(title)
    p.add_tools(WheelPanTool(dimension="height"))
    p.toolbar.active_scroll = p.tools[-1]
    cells = p.rect(x="x", y="y", width="w", height=1, source=source, line_color=INK, line_alpha="edge",
                   line_dash="dotted", fill_alpha="alpha", fill_color={"field": "shade", "transform": mapper})
    size = f"{COL / ADVANCE:.2f}px"
    wide_source = wide_source if wide_source is not None else ColumnDataSource({"x": [], "y": [], "char": []})
    for src, field, font, align, name in ((lines_source, "line", FONT, "left", "text_ink"),
                                          (wide_source, "char", WIDE_FONT, "center", "text_wide")):
        # add_glyph: one glyph model per renderer (p.text builds five, for selection states ink never has)
        p.add_glyph(src, Text(x="x", y="y", text=field, text_font={"value": font}, text_font_size=size,
                              text_align=align, text_baseline="middle", text_color=INK), name=name)
    cells.name = "text_cells"
    tips = [("token", "@token"), ("id", "@id"), ("step", "@step"), ("value", "@value{0.0000}")]
    p.add_tools(HoverTool(renderers=[cells], tooltips=tips + ([(loss, "@loss{0.000}")] if loss else [])))
    ends = ("-max", "+max") if half is None else (f"{-half:.3g}", f"{half:.3g}")
    p.add_layout(ColorBar(color_mapper=mapper, ticker=FixedTicker(ticks=[-1, -0.5, 0, 0.5, 1]), width=12,
                          major_label_overrides={-1: ends[0], 0: "0", 1: ends[1], -0.5: "", 0.5: ""},
                          location=(0, 0)), "right")
    return p


def shade(values: np.ndarray, half: float) -> np.ndarray:
    """``values`` over the colour range, clipped to -1..1; NaN stays NaN (the mapper's NAN_COLOUR)."""
    return np.clip(np.asarray(values, np.float32) / half, -1, 1)


def per_cell(values: np.ndarray | None, steps: np.ndarray, s: int) -> np.ndarray:
    """float32 ``[cells]``: each cell's step's entry of ``values`` (``[e - s]``, steps ``s..e-1``); NaN
    for a cell no step covers, and everywhere when ``values`` is None."""
    out = np.full(len(steps), np.nan, np.float32)
    if values is not None:
        ok = steps >= 0
        out[ok] = np.asarray(values, np.float32)[steps[ok] - s]
    return out


def text_data(drawn, steps: np.ndarray, pos: np.ndarray, s: int, values: np.ndarray, loss: np.ndarray | None,
              tokens: list[str], ids: np.ndarray | None, half: float) -> tuple[dict, dict, dict]:
    """``(cells, lines, wide)`` for ``text_figure``'s three sources; colours span ``-half..half``. ``drawn``,
    ``steps`` and ``pos`` as ``steps.pieces`` gives them; ``values`` and ``loss`` (or None) per step of
    the page ``s..``; ``tokens`` as shown and ``ids`` (int64, or None: -1 in every cell), per step of
    the page."""
    cells, lines, wide = layout(drawn)
    has = steps >= 0
    cells["step"], cells["pos"] = steps, pos
    cells["token"] = [tokens[t - s] if t >= 0 else "" for t in steps]
    cells["id"] = np.where(has, ids[np.maximum(steps - s, 0)], -1) if ids is not None and len(ids) \
        else np.full(len(steps), -1, np.int64)          # numbers, not strings: 10,000 strings cost 50 ms to send
    cells["value"] = per_cell(values, steps, s)        # NaN stays NaN: the hover prints "NaN"
    cells["shade"] = shade(cells["value"], half)
    cells["loss"] = per_cell(loss, steps, s)
    cells["alpha"] = has.astype(np.float32)
    cells["edge"] = (has & (pos < 0)).astype(np.float32)
    return cells, lines, wide


def heatmap_figure(matrix: np.ndarray, labels: list[str], start: int, *, width: int = 1400,
                   title: str = "", half: float | None = None, axis: str = "character position") -> tuple[figure, ColumnDataSource, LinearColorMapper]:
    """``matrix [units, time]`` as an image, one row per unit (first on top), time from ``start``."""
    mapper = LinearColorMapper(palette=PALETTE, low=-1, high=1, nan_color=NAN_COLOUR)
    src = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
    p = figure(width=width, height=80 + 16 * max(len(labels), 4), name="heatmap",
               x_range=Range1d(start, start + 1), y_range=Range1d(0, max(len(labels), 1)),
               tools="xpan,xwheel_zoom,reset", toolbar_location="above")
    p.title.text = plain(title)
    p.image(image="image", x="x", y="y", dw="dw", dh="dh", source=src, color_mapper=mapper)
    p.xaxis.axis_label = axis
    p.add_layout(ColorBar(color_mapper=mapper, width=12), "right")
    set_heatmap(p, src, mapper, matrix, labels, start, half)
    return p, src, mapper


def set_heatmap(p, src, mapper, matrix: np.ndarray, labels: list[str], start: int, half: float | None = None):
    """Replace the heatmap's data in place (the dashboard calls this on every change). Each row is
    divided by its own unit's colour range (1 for bounded kinds), so a cell state at 40 and a gate at
    0.9 share one -1..1 scale."""
    matrix = np.array(matrix, np.float32).reshape(len(labels), -1)       # NaN stays NaN: NAN_COLOUR
    T = max(matrix.shape[1], 1)
    for key in dict.fromkeys(lab.rsplit(":", 1)[0] for lab in labels):
        rows = [j for j, lab in enumerate(labels) if lab.rsplit(":", 1)[0] == key]
        matrix[rows] /= row_ranges(key, matrix[rows])[:, None]
    mapper.update(low=-1, high=1)
    src.data = {"image": [matrix[::-1]], "x": [start], "y": [0], "dw": [T], "dh": [max(len(labels), 1)]}
    p.x_range.update(start=start, end=start + T)
    p.y_range.update(start=0, end=max(len(labels), 1))
    p.height = 80 + int(np.clip(16 * len(labels), 64, 640))
    labelled = len(labels) <= 40                 # a whole layer gets no per-row labels: they would overlap
    ticks = [len(labels) - 1 - j + 0.5 for j in range(len(labels))] if labelled else []
    p.yaxis.ticker = FixedTicker(ticks=ticks)
    p.yaxis.major_label_overrides = {t: plain(lab) for t, lab in zip(ticks, labels)}
    p.yaxis.axis_label = None if labelled else plain(f"{len(labels)} units (top: index 0)")
