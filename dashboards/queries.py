"""What the dashboard's views show, computed from a Run and the current selection, apart from any view
(as the data queries of Bokeh's movies example live apart from its figures).

Everything read from a Run is data: strings that go into HTML pass ``html.escape`` here, numbers are
formatted for reading (``fmt``), and analysis tables are checked against the columns the views read.
"""
from __future__ import annotations

import html
from typing import NamedTuple

import numpy as np
import pandas as pd

from rnnscope.analysis.patterns import rank_units, span_scores
from rnnscope.store import parse_key

from .figures import colour_range, per_cell, shade, shown, shown_text, text_data
from .steps import Documents, marker, page_chars, pieces

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


def unit_values(run, key: str, index: int, s: int, e: int) -> np.ndarray:
    """``[e - s]`` one unit over the page's steps, float64 (NaN kept)."""
    return np.asarray(run[key][s:e, index], np.float64)


def step_word(run) -> str:
    """What the Run's steps are called on screen: a Run of one step per character reads as it always
    has ("characters 0-10,000"); any other in steps."""
    return "characters" if run.manifest.get("encoder", {}).get("kind", "char") == "char" else "steps"


def axis_name(run) -> str:
    return "character position" if step_word(run) == "characters" else "step"


def loss_name(run) -> str | None:
    """What the hover calls the Run's loss; None when it has none."""
    if run.loss is None:
        return None
    kind = (run.manifest.get("loss") or {}).get("kind", "next-token")
    return f"{kind} loss" if kind == "next-token" else "loss"


class TextPage(NamedTuple):
    """A page of the text view: ``text_figure``'s three sources and the colour scale's half-width."""
    cells: dict
    lines: dict
    wide: dict
    half: float


def text_cells(run, docs: Documents, document: int, key: str, index: int, s: int, e: int) -> TextPage:
    """The page of steps ``[s, e)`` of ``document``, as the text view draws it."""
    c0, c1 = page_chars(run.spans, docs, document, s, e)
    drawn, steps, pos = pieces(run.text, run.spans, run.ids, s, e, c0, c1)
    values = unit_values(run, key, index, s, e)
    half = colour_range(key, values)
    tokens = [shown_text(t) if t else marker(run.ids, s + i) for i, t in enumerate(run.tokens(s, e))]
    ids = None if run.ids is None else np.asarray(run.ids[s:e], np.int64)
    loss = None if run.loss is None else run.loss[s:e]
    return TextPage(*text_data(drawn, steps, pos, s, values, loss, tokens, ids, half), half)


def recolour(run, key: str, index: int, s: int, e: int, steps: np.ndarray) -> tuple[dict, float]:
    """Only the two columns a new unit changes (the layout stays in the browser); ``steps``: each
    cell's step, as ``text_cells`` laid them out."""
    values = unit_values(run, key, index, s, e)
    half = colour_range(key, values)
    cell_values = per_cell(values, np.asarray(steps, np.int64), s)
    return {"value": cell_values, "shade": shade(cell_values, half)}, half


def page_label(word: str, s: int, e: int, n: int, docs: Documents, document: int) -> str:
    """Which page is shown, as escaped HTML: ``word`` ("characters" or "steps") ``s``-``e`` of ``n``, and
    the document where the Run has several, as the picker lists it (``N: name``, counted from 0 like
    ``export --document N``)."""
    where = f"{word} {s:,}&ndash;{e:,} of {n:,}"
    if len(docs) > 1:
        where += (f" &middot; document <b>{document}: {esc(docs.names[document])}</b> "
                  f"(of 0&ndash;{len(docs) - 1:,})")
    return where


def unit_info(neurons: pd.DataFrame | None, unit: str, where: str, half: float) -> str:
    """The info line above the text, as escaped HTML (``where``: ``page_label``'s, already escaped)."""
    found = ""
    if neurons is not None:
        hit = neurons[neurons["unit"] == unit].dropna(subset=["strength"]).head(1)
        if len(hit):
            r = hit.iloc[0]
            found = (f" &middot; best feature <b>{esc(r['feature'])}</b>: {esc(r['metric'])} "
                     f"{fmt(r['selection_score'])} on selection (q={fmt(r['selection_q'])}), "
                     f"{fmt(r['heldout_score'])} held out, selectivity {fmt(r['selectivity'])}")
    return (f"<b>{esc(unit)}</b> &middot; {where}"
            f" &middot; colour scale &plusmn;{fmt(half)}{found}")


NEURON_COLUMNS = ["unit", "feature", "metric", "direction", "selection_score", "selection_q", "heldout_score",
                  "heldout_q", "selectivity"]
CONTEXT_COLUMNS = ["side", "rank", "value", "step", "context"]


def context_rows(contexts: pd.DataFrame, unit: str, docs: Documents | None = None) -> dict:
    """The selected unit's top and bottom contexts: the step's token in brackets, control and bidi
    characters made visible (the table writes cells as plain text), numbers as ``fmt`` strings; with
    ``docs`` (a Run of several), each window's document as the picker lists it (``N: name``)."""
    t = contexts[contexts["unit"] == unit].sort_values(["side", "rank"], ascending=[False, True])
    if {"token_start", "token_end"} <= set(t.columns):     # the step's own token (a word, a subword) in brackets
        a, b = (pd.to_numeric(t[c], errors="coerce").fillna(-1).astype(np.int64) for c in ("token_start", "token_end"))
    else:                                                   # a table from before steps: one character per step
        a = t["offset"].astype(np.int64)
        b = a + 1

    def bracket(c: str, a: int, b: int) -> str:
        if a < 0 or b < a:                                  # a step without text (BOS, EOS, pad)
            return "".join(shown(ch) for ch in c) + " [no text]"
        return ("".join(shown(ch) for ch in c[:a]) + "[" + "".join(shown(ch) for ch in c[a:b]) + "]"
                + "".join(shown(ch) for ch in c[b:]))
    shown_context = [bracket(str(c), int(x), int(y)) for c, x, y in zip(t["context"], a, b)]
    rows = {"side": [str(v) for v in t["side"]], "rank": [str(int(v)) for v in t["rank"]],
            "value": [fmt(v) for v in t["value"]], "step": [str(int(v)) for v in t["step"]],
            "context": shown_context}
    if docs is not None and len(docs) > 1:          # a step from someone else's table may be past the Run's end
        found = [docs.of(int(v)) for v in t["step"]]
        rows["document"] = [f"{d}: {shown_text(docs.names[d][:60])}" if d < len(docs) else "?" for d in found]
    return rows


def neuron_rows(neurons: pd.DataFrame, feature: str, limit: int = 2000) -> dict:
    """The neuron table's rows for one feature, numbers as ``fmt`` strings."""
    t = neurons[neurons["feature"] == feature].head(limit)
    return {c: [fmt(v) for v in t[c]] if t[c].dtype.kind == "f" else [str(v) for v in t[c]]
            for c in NEURON_COLUMNS}


def top_units(neurons: pd.DataFrame, feature: str, k: int) -> list[str]:
    return neurons[neurons["feature"] == feature].dropna(subset=["strength"]).head(k)["unit"].tolist()


def heat_matrix(run, units: list[str], s: int, e: int) -> np.ndarray:
    """``[units, e - s]`` float32 (NaN kept). Each key's page is read once, as one block of rows
    (a whole key of 256 units read unit by unit cost 257 opens and strided reads: 0.3 s)."""
    if not units:
        return np.zeros((1, max(e - s, 1)), np.float32)
    parts = [u.rsplit(":", 1) for u in units]
    out = np.empty((len(units), e - s), np.float32)
    for key in dict.fromkeys(k for k, _ in parts):
        rows = [j for j, (k, _) in enumerate(parts) if k == key]
        block = np.asarray(run[key][s:e], np.float32)             # [e - s, units of key]
        out[rows] = block[:, [int(parts[j][1]) for j in rows]].T
    return out


def grad_norms(run, keys: list[str], s: int, e: int) -> dict:
    """``pos`` and, per gradient key, the norm over units at each step of the page (floored at 1e-30
    for the log axis; NaN stays NaN)."""
    data = {"pos": np.arange(s, e)}
    for k in keys:
        x = np.asarray(run[k][s:e], np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.sqrt((x * x).sum(1))
        data[k] = np.where(np.isfinite(v), np.maximum(v, 1e-30), np.nan)
    return data


def pattern_keys(state_keys: list[str]) -> list[str]:
    return [k for k in state_keys if parse_key(k)["kind"] in ("h", "c")] or state_keys


def pattern_rows(run, keys: list[str], s: int, e: int, a: int, b: int, top: int) -> dict:
    """The ``top`` units on inside ``[a, b)`` and off around it, within the page ``[s, e)``."""
    has_text = np.asarray(run.has_text[s:e])      # BOS/EOS/pad steps are in no span and in no surround
    scores = {k: span_scores(run[k][s:e], a - s, b - s, has_text=has_text) for k in keys}
    rows = rank_units(scores, top)
    return {"unit": [f"{k}:{i}" for k, i, *_ in rows],
            **{c: [fmt(r[j]) for r in rows] for j, c in ((2, "inside"), (3, "around"), (4, "score"))}}


def pattern_note(text: str, a: int, b: int, found: int, word: str = "span") -> str:
    """``text``: the selected steps' text; ``a``, ``b``: the steps."""
    part = text if len(text) <= 80 else text[:77] + "..."
    return (f"{word} {a:,}&ndash;{b:,} (<code>{esc(part)}</code>): "
            f"top {found} units on inside it, off around it")


def missing_note(what: str, command: str, why: str | None = None) -> str:
    reason = f"{esc(why)}. " if why else "this Run has no data for it yet. "
    return (f"<p><b>{esc(what)}</b>: {reason}"
            f"Run <code>{esc(command)}</code> to produce it.</p>")
