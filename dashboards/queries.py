"""What the dashboard's views show, computed from a Run and the current selection, apart from any view
(as the data queries of Bokeh's movies example live apart from its figures).

Everything read from a Run is data: strings that go into HTML pass ``html.escape`` here, numbers are
formatted for reading (``fmt``), and analysis tables are checked against the columns the views read.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from rnnscope.analysis.gradflow import gradient_norms
from rnnscope.analysis.patterns import rank_units, span_scores
from rnnscope.probe import parse_key

from .figures import colour_range, shade, shown, text_data

# The columns each view reads; a table without them is shown as missing, never as a traceback.
SCHEMA = {"neurons": {"unit": "O", "key": "O", "index": "iu", "feature": "O", "metric": "O", "direction": None,
                      "selection_score": "f", "selection_q": "f", "heldout_score": "f", "heldout_q": "f",
                      "selectivity": "f", "strength": "f"},
          "contexts": {"unit": "O", "side": "O", "rank": "iu", "step": "iu", "value": "f", "offset": "iu",
                       "context": "O"},
          "saturation": {"layer": None, "gate": None, "unit": "O", "left": "f", "right": "f"},
          "grad_decay": {"key": "O", "lag": "iuf", "geo_mean": "f"},
          "half_lives": {"key": "O", "half_life": "f"}}


def esc(s) -> str:
    """A Run's string for a Div: control and bidi characters made visible, then HTML-escaped."""
    return html.escape("".join(shown(c) for c in str(s)))


def fmt(x) -> str:
    """A number for reading: 3 significant digits, scientific under 1e-3, "NaN" for NaN."""
    x = float(x)
    if not np.isfinite(x):
        return "NaN" if np.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 else f"{x:.3g}"


def checked(table: pd.DataFrame | None, name: str) -> tuple[pd.DataFrame | None, str | None]:
    """``(table, None)`` when ``table`` has the columns and kinds the views read, else ``(None, why)``."""
    if table is None:
        return None, None
    for col, kinds in SCHEMA[name].items():
        if col not in table.columns:
            return None, f"the {name} table has no column {col!r}"
        if kinds and table[col].dtype.kind not in kinds:
            return None, f"the {name} table's column {col!r} holds {table[col].dtype}, not the expected kind"
    strings = [c for c, k in SCHEMA[name].items() if k == "O"]
    for col in strings:
        if not table[col].map(lambda v: isinstance(v, str)).all():
            return None, f"the {name} table's column {col!r} holds non-strings"
    return table, None


def page(n_chars: int, start: int, window: int) -> tuple[int, int]:
    """The characters ``[s, e)`` of the page starting at ``start``."""
    s = int(min(max(0, start), max(0, n_chars - 1)))
    return s, min(n_chars, s + window)


def unit_values(run, key: str, index: int, s: int, e: int) -> np.ndarray:
    """``[e - s]`` one unit over the page, float64 (NaN kept)."""
    return np.asarray(run[key][s:e, index], np.float64)


def text_cells(run, key: str, index: int, s: int, e: int) -> tuple[dict, dict, float]:
    values = unit_values(run, key, index, s, e)
    half = colour_range(key, values)
    cells, lines = text_data(run.text[s:e], s, values, run.loss[s:e], half)
    return cells, lines, half


def recolour(run, key: str, index: int, s: int, e: int) -> tuple[dict, float]:
    """Only the two columns a new unit changes (the layout stays in the browser)."""
    values = unit_values(run, key, index, s, e)
    half = colour_range(key, values)
    return {"value": values.astype(np.float32), "shade": shade(values, half)}, half


def unit_info(neurons: pd.DataFrame | None, unit: str, s: int, e: int, n: int, half: float) -> str:
    """The info line above the text, as escaped HTML."""
    found = ""
    if neurons is not None:
        hit = neurons[neurons["unit"] == unit].dropna(subset=["strength"]).head(1)
        if len(hit):
            r = hit.iloc[0]
            found = (f" &middot; best feature <b>{esc(r['feature'])}</b>: {esc(r['metric'])} "
                     f"{fmt(r['selection_score'])} on selection (q={fmt(r['selection_q'])}), "
                     f"{fmt(r['heldout_score'])} held out, selectivity {fmt(r['selectivity'])}")
    return (f"<b>{esc(unit)}</b> &middot; characters {s:,}&ndash;{e:,} of {n:,}"
            f" &middot; colour scale &plusmn;{fmt(half)}{found}")


NEURON_COLUMNS = ["unit", "feature", "metric", "direction", "selection_score", "selection_q", "heldout_score",
                  "heldout_q", "selectivity"]
CONTEXT_COLUMNS = ["side", "rank", "value", "step", "context"]


def context_rows(contexts: pd.DataFrame, unit: str) -> dict:
    """The selected unit's top and bottom contexts: the step's character in brackets, control and bidi
    characters made visible (the table writes cells as plain text), numbers as ``fmt`` strings."""
    t = contexts[contexts["unit"] == unit].sort_values(["side", "rank"], ascending=[False, True])
    shown_context = ["".join(shown(ch) for ch in c[:o]) + "[" + "".join(shown(ch) for ch in c[o:o + 1]) + "]"
                     + "".join(shown(ch) for ch in c[o + 1:]) for c, o in zip(t["context"], t["offset"])]
    return {"side": [str(v) for v in t["side"]], "rank": [str(int(v)) for v in t["rank"]],
            "value": [fmt(v) for v in t["value"]], "step": [str(int(v)) for v in t["step"]],
            "context": shown_context}


def neuron_rows(neurons: pd.DataFrame, feature: str, limit: int = 2000) -> dict:
    """The neuron table's rows for one feature, numbers as ``fmt`` strings."""
    t = neurons[neurons["feature"] == feature].head(limit)
    return {c: [fmt(v) for v in t[c]] if t[c].dtype.kind == "f" else [str(v) for v in t[c]]
            for c in NEURON_COLUMNS}


def top_units(neurons: pd.DataFrame, feature: str, k: int) -> list[str]:
    return neurons[neurons["feature"] == feature].dropna(subset=["strength"]).head(k)["unit"].tolist()


def heat_matrix(run, units: list[str], s: int, e: int) -> np.ndarray:
    """``[units, e - s]`` float32 (NaN kept)."""
    rows = [np.asarray(run[u.rsplit(":", 1)[0]][s:e, int(u.rsplit(":", 1)[1])], np.float32) for u in units]
    return np.stack(rows) if rows else np.zeros((1, max(e - s, 1)), np.float32)


def grad_norms(run, keys: list[str], s: int, e: int) -> dict:
    """``pos`` and, per gradient key, the norm over units at each step of the page (floored at 1e-30
    for the log axis; NaN stays NaN)."""
    norms = gradient_norms({k: run[k][s:e] for k in keys}, text=run.text[s:e])
    data = {"pos": np.arange(s, e)}
    for k in keys:
        v = norms[k].to_numpy()
        data[k] = np.where(np.isnan(v), np.nan, np.maximum(v, 1e-30))
    return data


def pattern_keys(state_keys: list[str]) -> list[str]:
    return [k for k in state_keys if parse_key(k)["kind"] in ("h", "c")] or state_keys


def pattern_rows(run, keys: list[str], s: int, e: int, a: int, b: int, top: int) -> dict:
    """The ``top`` units on inside ``[a, b)`` and off around it, within the page ``[s, e)``."""
    scores = {k: span_scores(run[k][s:e], a - s, b - s) for k in keys}
    rows = rank_units(scores, top)
    return {"unit": [f"{k}:{i}" for k, i, *_ in rows],
            **{c: [fmt(r[j]) for r in rows] for j, c in ((2, "inside"), (3, "around"), (4, "score"))}}


def pattern_note(text: str, a: int, b: int, found: int) -> str:
    part = text[a:b] if b - a <= 80 else text[a:a + 77] + "..."
    return (f"span {a:,}&ndash;{b:,} (<code>{esc(part)}</code>): "
            f"top {found} units on inside it, off around it")


def missing_note(what: str, command: str, why: str | None = None) -> str:
    reason = f"{esc(why)}. " if why else "this Run has no data for it yet. "
    return (f"<p><b>{esc(what)}</b>: {reason}"
            f"Run <code>{esc(command)}</code> to produce it.</p>")
