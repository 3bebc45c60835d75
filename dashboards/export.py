"""Heatmaps to PNG and SVG (Bokeh's exporters driving headless Chromium) and to one standalone HTML
file with BokehJS inlined (it opens offline). The same figures serve notebooks: ``show(fig)``.

    fig = unit_figure(run, "rnn.l0.c:199", 0, 3000);  export(fig, "comment_cell.png")
    fig = units_figure(run, ["rnn.l0.c:199", "rnn.l1.c:230"], 0, 2000);  export(fig, "cells.svg")
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from bokeh.models import ColumnDataSource

from rnnscope.store import Run, open_run, read_table
from rnnscope.errors import RnnscopeError, escaped

from .figures import heatmap_figure, shown, text_figure
from .queries import axis_name, loss_name, step_word, text_cells
from .steps import Documents

MAX_STEPS = 20000
FORMATS = (".png", ".svg", ".html")


def _run(run) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def parse_unit(run: Run, unit: str) -> tuple[str, int]:
    key, _, index = unit.rpartition(":")
    if not key or not index.isdigit():
        raise RnnscopeError(f"{unit!r} is not a unit", "write units as KEY:INDEX, e.g. rnn.l0.c:12")
    if key not in run:
        raise RnnscopeError(f"unknown unit {unit}: the run has no key {key!r}",
                            f"use one of {', '.join(run.keys()[:8])}")
    n = run[key].shape[1]
    if int(index) >= n:
        raise RnnscopeError(f"unknown unit {unit}: {key} has {n} units", f"use an index from 0 to {n - 1}")
    return key, int(index)


def _span(run: Run, start: int, end: int | None, document: str | int | None) -> tuple[int, int, Documents, int]:
    """Absolute steps ``[s, e)`` inside one document, its table and index. With ``document``, ``start``
    and ``end`` count from the document's first step; without, they are the Run's steps and the
    document is the one holding ``start``. ``end`` defaults to 3,000 steps on (or the document's end)."""
    docs = Documents(run.documents)
    d = docs.find(document) if document is not None else None
    base = int(docs.step_start[d]) if d is not None else 0
    if d is None:
        if not 0 <= start < len(run):
            raise RnnscopeError(f"step {start} is not inside the run's {len(run):,}", f"use 0 <= --start < {len(run)}")
        d = docs.of(start)
    first, last = int(docs.step_start[d]), int(docs.step_end[d])
    s = base + start
    e = min(last, s + 3000) if end is None else base + end
    where = f"document {shown_name(docs.names[d])!r} (steps {first - base}..{last - base})" if len(docs) > 1 \
        else f"the run's {len(run):,} steps"
    if not first <= s < e <= last:
        raise RnnscopeError(f"steps {s - base}..{e - base} are not inside {where}",
                            f"use {first - base} <= --start < --end <= {last - base}"
                            + ("" if document is not None or len(docs) == 1 else ", or pick one with --document"))
    if e - s > MAX_STEPS:
        raise RnnscopeError(f"{e - s:,} steps is more than one picture holds ({MAX_STEPS:,})", "narrow --start/--end")
    return s, e, docs, d


def shown_name(name: str) -> str:
    return "".join(shown(c) for c in name)


def unit_figure(run, unit: str, start: int = 0, end: int | None = None, document: str | int | None = None):
    """The text of steps ``start`` to ``end`` (default: 3,000 steps) coloured by one unit, each step's
    span as the dashboard colours it. ``document`` (a name or index): count the steps from its start.
    A frames Run (no text): the unit against its time stamps above its key's units x steps."""
    run = _run(run)
    key, index = parse_unit(run, unit)
    s, e, docs, d = _span(run, start, end, document)
    where = f", document {shown_name(docs.names[d])}" if len(docs) > 1 else ""
    if run.frames:                      # no text to colour: the unit against time, over its key's units
        from .frames import frames_figure
        return frames_figure(run, key, index, s, e, where)
    page = text_cells(run, docs, d, key, index, s, e)
    return text_figure(ColumnDataSource(page.cells), ColumnDataSource(page.lines),
                       wide_source=ColumnDataSource(page.wide), half=page.half, lines=10 ** 6,
                       title=f"{unit}, {step_word(run)} {s:,}-{e:,}{where}", loss=loss_name(run))


def units_figure(run, units: list[str], start: int = 0, end: int | None = None, width: int = 1400,
                 document: str | int | None = None):
    """A units x time heatmap over steps (``start``, ``end``, ``document`` as ``unit_figure``)."""
    run = _run(run)
    parsed = [parse_unit(run, u) for u in units]
    s, e, _, _ = _span(run, start, end, document)
    matrix = np.stack([np.asarray(run[k][s:e, i], np.float32) for k, i in parsed])
    fig, _, _ = heatmap_figure(matrix, list(units), s, width=width, axis=axis_name(run),
                               title=f"{len(units)} units, {step_word(run)} {s:,}-{e:,} (each row on its own scale)")
    return fig


def feature_values(run: Run, feature: str, docs: Documents, d: int, s: int, e: int) -> np.ndarray | None:
    """float64 ``[e - s]``: ``feature`` at each step of ``[s, e)`` in document ``d`` (the value at the last
    character of its span; NaN for a step without text): a user's own from the Run's
    ``analysis/features.parquet`` (written by ``analyze --features file.py:fn``), a built-in computed over
    the document from its start so a comment or string opened before ``s`` counts. None for a feature
    neither holds."""
    from rnnscope.analysis.features import BUILTIN, compute
    from rnnscope.analysis.source import language_of
    stored = read_table(run, "features")
    if stored is not None and feature in stored.columns and feature != "step":
        if len(stored) != len(run):
            raise RnnscopeError(f"{run.path}'s features table has {len(stored):,} rows for {len(run):,} steps",
                                "run `rnnscope analyze` with --features again")
        return stored[feature].to_numpy(np.float64)[s:e]
    if feature not in BUILTIN:
        return None
    c0 = int(docs.char_start[d])
    ends = run.spans[s:e, 1]
    c1 = int(ends.max()) if (ends > 0).any() else c0
    if c1 <= c0:
        return np.full(e - s, np.nan)
    import warnings
    with warnings.catch_warnings():                 # a feature constant over the window is still drawn
        warnings.simplefilter("ignore")
        track = compute(run.text[c0:c1], [feature], language_of(run) or "c")[feature].to_numpy(np.float64)
    return np.where(ends > 0, track[np.maximum(ends - 1 - c0, 0)], np.nan)


def feature_figure(run, feature: str, top: int = 10, start: int = 0, end: int | None = None,
                   document: str | int | None = None, *, own_row: bool = True, width: int | None = None):
    """The ``top`` units for ``feature`` as a heatmap over steps (``start``, ``end``, ``document`` as
    ``unit_figure``), titled with the feature and the document, with the feature's own values as the
    top row when rnnscope computes it (``own_row``). ``width`` defaults to one pixel per step from
    1,400 to 10,000 pixels, so thousands of steps keep a column each."""
    run = _run(run)
    units = top_units_for(run, feature, top)
    s, e, docs, d = _span(run, start, end, document)
    matrix = np.stack([np.asarray(run[k][s:e, i], np.float32) for k, i in (parse_unit(run, u) for u in units)])
    labels = list(units)
    track = feature_values(run, feature, docs, d, s, e) if own_row else None
    if track is not None:
        matrix, labels = np.vstack([track[None].astype(np.float32), matrix]), [f"feature {feature}", *labels]
    where = f", document {shown_name(docs.names[d])}" if len(docs) > 1 else ""
    title = f"{feature}: top {len(units)} units, {step_word(run)} {s:,}-{e:,}{where} (each row on its own scale)"
    fig, _, _ = heatmap_figure(matrix, labels, s, width=width or int(min(max(1400, e - s + 200), 10000)),
                               axis=axis_name(run), title=shown_name(title))
    return fig


def top_units_for(run, feature: str, k: int) -> list[str]:
    run = _run(run)
    table = read_table(run, "neurons")
    if table is None:
        raise RnnscopeError(f"{run.path} has no neuron table", f"run `rnnscope analyze {run.path}` first")
    rows = table[table["feature"] == feature].dropna(subset=["strength"])
    if rows.empty:
        raise RnnscopeError(f"the neuron table has no feature {feature!r}",
                            f"use one of {', '.join(sorted(table['feature'].unique()))}")
    return rows.head(k)["unit"].tolist()


def chromium_driver(*, console_log: bool = False, size: tuple[int, int] = (1600, 1200)):
    """A headless Chromium for Bokeh's exporters (and the browser tests), from the system packages.
    ``console_log``: keep the page's console messages for ``driver.get_log('browser')``."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RnnscopeError("PNG and SVG export need Chromium and chromedriver, which are not installed",
                            "apt-get install chromium chromium-driver (or export to .html)")
    from selenium import webdriver
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(arg)
    if console_log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def page_title(fig) -> str:
    """The HTML page's ``<title>``: the figure's title as plain text (Bokeh 3 may hold it as a
    ``PlainText`` model, whose repr became the title), hidden characters escaped, cut to ``LIMIT``
    characters (a document name may be a megabyte); Bokeh's template escapes it as HTML."""
    text = getattr(getattr(fig, "title", None), "text", None)
    text = getattr(text, "text", text)
    return escaped(text) if isinstance(text, str) and text.strip() else "rnnscope"


def export(fig, out) -> Path:
    """Write ``fig`` to ``out`` (.png, .svg or .html), atomically: a failed export leaves nothing."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise RnnscopeError(f"cannot export to {out.suffix or 'a file without a suffix'}",
                            f"name the output {', '.join('*' + f for f in FORMATS)}")
    if not out.parent.exists():
        raise RnnscopeError(f"directory {out.parent} does not exist", "create it or write elsewhere")
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")
    try:
        if out.suffix == ".html":
            from bokeh.embed import file_html
            from bokeh.resources import INLINE
            tmp.write_text(file_html(fig, INLINE, title=page_title(fig)), encoding="utf-8")
        else:
            from bokeh.io import export_png, export_svg
            driver = chromium_driver()
            try:
                if out.suffix == ".png":
                    export_png(fig, filename=tmp, webdriver=driver)
                else:
                    fig.output_backend = "svg"
                    export_svg(fig, filename=tmp, webdriver=driver)
            finally:
                driver.quit()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_out_file(out, overwrite: bool) -> Path:
    """An export's ``--out``: FILE.png, .svg or .html, not there yet (or ``overwrite``), not a folder or link."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".html"):
        raise RnnscopeError(f"{out} has no .png, .svg or .html extension", "name the output FILE.png, FILE.svg or "
                            "FILE.html")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RnnscopeError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    if out.is_dir() or (out.is_symlink() and not out.is_file()):
        raise RnnscopeError(f"{out} is a directory or a dangling link, not a file", "give a file name for --out")
    return out


def export_run(run, out, *, unit=None, units=None, feature=None, top: int = 10, start: int = 0, end=None,
               document=None, attention=None) -> Path:
    """``rnnscope export RUN``: one unit over the text (``unit``), or a heatmap of ``units``, of
    the ``top`` units for ``feature``, or of an ``attention`` module's steps x source, written to ``out``."""
    if sum(map(bool, (unit, units, feature, attention))) != 1:
        raise RnnscopeError("say what to draw with exactly one of --unit, --units, --feature or --attention",
                            "e.g. --unit rnn.l0.c:12, --units rnn.l0.c:1,rnn.l1.c:2, --feature in_comment --top 10, "
                            "or --attention decoder.attn")
    if attention:                       # one document's steps x source
        from .attention import run_attention_figure
        return export(run_attention_figure(_run(run), attention, document), out)
    if unit:
        fig = unit_figure(run, unit, start, end, document=document)
    elif units:
        fig = units_figure(run, units, start, end, document=document)
    else:                               # named for its feature and document, the feature's own row on top
        fig = feature_figure(run, feature, top, start, end, document)
    return export(fig, out)
