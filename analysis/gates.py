"""Gate saturation (Karpathy, Johnson & Fei-Fei 2015, section 4.3): per gate and unit, the fraction of
steps the gate is left-saturated (< 0.1, nearly closed) and right-saturated (> 0.9, nearly open).
The paper's scatter puts each unit at (left, right): forget-gate units on the right edge are the
ones that remember for a long time; units in the bottom-left corner are never saturated."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rnnscope.store import parse_key

from . import reductions
from .source import as_source

GATES = {"i", "f", "o", "r", "z"}          # sigmoid gates (LSTM i f o, GRU r z); g and n are tanh


def gate_saturation(run, *, text: str | None = None, low: float = 0.1, high: float = 0.9,
                    chunk: int = 65536, client=None) -> pd.DataFrame:
    """One row per unit of every recorded sigmoid gate: ``key, layer, gate, index, unit, left, right``
    (fractions of steps below ``low`` / above ``high``), plus ``mean``. ``client``: a Dask client; a
    Run's shards are then counted on its workers and their counts added."""
    src = as_source(run, text)
    keys = src.need(GATES, "gate saturation", "record the gates (rnnscope probe without --kinds, or --kinds i,f,o)")
    frames = []
    for key in keys:
        a = src.arrays[key]
        T, U = a.shape
        found = None if client is None else reductions.saturation(client, a, low, high, chunk)
        left, right, total = found or _counts(a, low, high, chunk)
        info = parse_key(key)
        frames.append(pd.DataFrame({"key": key, "layer": info["layer"], "reverse": info["reverse"],
                                    "gate": info["kind"], "index": np.arange(U),
                                    "unit": [f"{key}:{i}" for i in range(U)],
                                    "left": left / T, "right": right / T, "mean": total / T}))
    return pd.concat(frames, ignore_index=True)


def _counts(a, low: float, high: float, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``a [steps, units]`` -> per unit: steps below ``low``, steps above ``high`` (int64), and the float64
    sum (NaN as 0), read ``chunk`` rows at a time."""
    U = a.shape[1]
    left, right, total = np.zeros(U, np.int64), np.zeros(U, np.int64), np.zeros(U)
    for s in range(0, a.shape[0], chunk):
        x = np.asarray(a[s:s + chunk], np.float32)
        left += (x < low).sum(0)
        right += (x > high).sum(0)
        total += np.nan_to_num(x).sum(0, dtype=np.float64)
    return left, right, total
