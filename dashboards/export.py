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

from rnnscope.store import read_table
from rnnscope.probe import Run, open_run
from rnnscope.errors import RnnscopeError

from .figures import colour_range, heatmap_figure, text_data, text_figure

MAX_CHARS = 20000
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


def _span(run: Run, start: int, end: int | None) -> tuple[int, int]:
    end = len(run) if end is None else end
    if not 0 <= start < end <= len(run):
        raise RnnscopeError(f"characters {start}..{end} are not inside the run's {len(run):,}",
                            f"use 0 <= --start < --end <= {len(run)}")
    if end - start > MAX_CHARS:
        raise RnnscopeError(f"{end - start:,} characters is more than one picture holds ({MAX_CHARS:,})",
                            "narrow --start/--end")
    return start, end


def unit_figure(run, unit: str, start: int = 0, end: int | None = None):
    """The text from ``start`` to ``end`` (default: 3,000 characters) coloured by one unit."""
    run = _run(run)
    key, index = parse_unit(run, unit)
    start, end = _span(run, start, min(len(run), start + 3000) if end is None else end)
    values = np.asarray(run[key][start:end, index], np.float64)
    half = colour_range(key, values)
    cells, lines = text_data(run.text[start:end], start, values, run.loss[start:end], half)
    return text_figure(ColumnDataSource(cells), ColumnDataSource(lines), half=half, lines=10 ** 6,
                       title=f"{unit}, characters {start:,}-{end:,}")


def units_figure(run, units: list[str], start: int = 0, end: int | None = None, width: int = 1400):
    """A units x time heatmap."""
    run = _run(run)
    parsed = [parse_unit(run, u) for u in units]
    start, end = _span(run, start, min(len(run), start + 3000) if end is None else end)
    matrix = np.stack([np.asarray(run[k][start:end, i], np.float32) for k, i in parsed])
    fig, _, _ = heatmap_figure(matrix, list(units), start, width=width,
                               title=f"{len(units)} units, characters {start:,}-{end:,} (each row on its own scale)")
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
            tmp.write_text(file_html(fig, INLINE, title=fig.title.text if fig.title else "rnnscope"),
                           encoding="utf-8")
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
