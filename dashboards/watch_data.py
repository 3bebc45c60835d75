"""What the live training dashboard shows, as columns for its ``ColumnDataSource``s, computed from the
watch log's tables apart from any view (the live app streams these rows; the exporter draws them whole).

Every function takes the rows of one table as the reader returns it (its schema's columns: all the
rows, or only those new since the last refresh) and returns the same columns whatever it is given,
an empty table included: ``ColumnDataSource.stream`` needs every column on every call. Numbers go out as float64 (Bokeh sends int64 as float anyway).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

SAT = ("i", "f", "o", "r", "z", "h")                  # every gate kind a layers table may carry
GATES = {"lstm": "ifo", "gru": "rz", "rnn": "h"}      # the kinds each family has (NaN in the others)
LOSS_COLS = ("step", "loss", "grad_norm", "grad_norm_after")
LAYER_COLS = ("step", "half_life", "param_grad_norm", *(f"sat_{g}" for g in SAT))


def _floats(frame: pd.DataFrame, col: str) -> np.ndarray:
    if col not in frame.columns:
        return np.full(len(frame), np.nan)
    # a copy: the array of a table read from Arrow is read-only, and the callers mask it in place
    return np.array(pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64, na_value=np.nan))


def grad_keys(manifest: dict) -> list[str]:
    """The state keys the log records gradients for (``rnn.l0.grad_h``...), in the manifest's order."""
    return [str(k) for k in manifest.get("keys", [])]


def layer_keys(manifest: dict) -> list[str]:
    """The layers (``rnn.l0``, ``rnn.l0_reverse``...): the state keys less their kind."""
    return list(dict.fromkeys(k.rpartition(".")[0] for k in grad_keys(manifest) if "." in k))


def family(manifest: dict, layer: str) -> str:
    """``lstm``, ``gru`` or ``rnn`` for a layer key, from its module's type in the manifest."""
    modules = (manifest.get("model") or {}).get("modules") or {}
    kind = str((modules.get(layer.rpartition(".")[0]) or {}).get("type", "")).lower()
    return next((f for f in GATES if f in kind), "rnn")


def loss_rows(steps: pd.DataFrame) -> dict:
    """One row per watched step: the loss (NaN where it was not finite), the global gradient norm
    before and after clipping."""
    out = {c: _floats(steps, c) for c in LOSS_COLS}
    out["loss"][~steps["loss_finite"].fillna(False).to_numpy(bool)] = np.nan
    out["loss"][~np.isfinite(out["loss"])] = np.nan
    return out


def clip_rows(steps: pd.DataFrame) -> dict:
    """The watched steps where clipping cut the gradient, or after which it did (``clips``: the events on every
    step since the previous watched one), at their loss and pre-clip norm."""
    clips = steps["clips"].fillna(0).to_numpy(np.int64)
    clipped = steps["clipped"].fillna(False).to_numpy(bool) | (clips > 0)
    rows = loss_rows(steps)
    return {**{c: rows[c][clipped] for c in ("step", "loss", "grad_norm")}, "clips": clips[clipped]}


def flag_rows(steps: pd.DataFrame, last_loss: float = np.nan) -> tuple[dict, float]:
    """The flagged steps (non-finite loss or gradient, a step that went backwards), each placed at the
    last finite loss before it (a NaN loss has no height of its own); ``last_loss`` carries that
    height over from the rows streamed before. Returns the rows and the new last finite loss."""
    loss = pd.Series(loss_rows(steps)["loss"])
    height = loss.ffill().fillna(last_loss).fillna(0.0).to_numpy(np.float64)
    flags = steps["flags"].fillna("").astype(str).to_numpy()
    hit = flags != ""
    finite = loss.dropna()
    last = float(finite.iloc[-1]) if len(finite) else last_loss
    return {"step": _floats(steps, "step")[hit], "y": height[hit], "flags": [str(f) for f in flags[hit]]}, last


def layer_rows(layers: pd.DataFrame, layer: str) -> dict:
    """One layer's rows: half-life through time, its parameter gradient norm, every gate's saturated
    fraction (NaN for the kinds its family lacks)."""
    mine = layers[layers["key"] == layer] if "key" in layers.columns else layers.iloc[:0]
    mine = mine.sort_values("step", kind="stable") if "step" in mine.columns else mine
    return {c: _floats(mine, c) for c in LAYER_COLS}


def decay_images(decay: pd.DataFrame, key: str, every: float) -> dict:
    """The decay heatmap for one state key as one image per watched step: a column of ``[lags, 1]``
    norms centred on the step, ``every`` wide, lag 0 (the loss) at the bottom. One image per step lets
    the live page append a step as one streamed row. Zero and negative norms become NaN: a log colour
    scale has no place for them."""
    out = {"step": [], "x": [], "y": [], "dw": [], "dh": [], "image": []}
    if not {"key", "step", "lag", "norm"} <= set(decay.columns):
        return out
    mine = decay[decay["key"] == key]
    for step, g in mine.groupby("step", sort=True):
        lags = g["lag"].to_numpy(np.int64)
        if len(lags) == 0 or lags.min() < 0:
            continue
        column = np.full(int(lags.max()) + 1, np.nan)
        column[lags] = _floats(g, "norm")
        column[~(column > 0)] = np.nan
        out["step"].append(float(step))
        out["x"].append(float(step) - every / 2)
        out["y"].append(-0.5)
        out["dw"].append(float(every))
        out["dh"].append(float(len(column)))
        out["image"].append(column.reshape(-1, 1))
    return out


def norm_range(images: list[np.ndarray], low: float = np.inf, high: float = 0.0) -> tuple[float, float]:
    """The positive range of the heatmap's norms, widened from ``(low, high)``, for a log colour
    scale; (1e-3, 1) before any norm is known."""
    for im in images:
        finite = im[np.isfinite(im)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not np.isfinite(low) or high <= 0:
        return 1e-3, 1.0
    return low, max(high, low * 10)
