"""Running per-unit statistics of a recording, in one compiled pass per chunk (``record`` keeps one per key)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from numba import njit

from rnnscope.store import DTYPES, split_key

OVERFLOW = {"float16": 65520.0, "float32": np.inf}    # |x| from which the stored value is Inf
# |x| below which a non-zero value is stored subnormal (relative error up to 100%) or zero
UNDERFLOW = {d: float(np.finfo(t).tiny) for d, t in DTYPES.items()}


@njit(cache=True, boundscheck=False)
def _accumulate(a, n, s, ss, lo, hi, limit, tiny):
    """One pass over ``a [rows, units]`` (float32, any strides): per unit, the count, sum and sum of
    squares (float64), min and max of the finite values. Returns the number of NaN/Inf values, of
    finite ones at or beyond ``limit`` in magnitude (those float16 stores as Inf), and of non-zero
    ones below ``tiny`` (stored subnormal or zero)."""
    rows, units = a.shape
    bad, over, under = 0, 0, 0
    for r in range(rows):
        for j in range(units):
            v = a[r, j]
            if np.isfinite(v):
                x = np.float64(v)
                n[j] += 1.0
                s[j] += x
                ss[j] += x * x
                lo[j] = min(lo[j], v)
                hi[j] = max(hi[j], v)
                if abs(v) >= limit:
                    over += 1
                elif v != 0 and abs(v) < tiny:
                    under += 1
            else:
                bad += 1
    return bad, over, under


class _UnitStats:
    """Running per-unit count, mean, spread, min and max over time, NaN and Inf left out, in one
    compiled pass per chunk (torch's column reductions over the gates' strided rows cost more
    than the probe's forward)."""

    def __init__(self, units: int):
        self.n, self.s, self.ss = np.zeros(units), np.zeros(units), np.zeros(units)
        self.lo, self.hi = np.full(units, np.inf), np.full(units, -np.inf)

    def add(self, a: np.ndarray, dtype: str) -> tuple[int, int, int]:
        """``a [rows, units]`` float32, to be stored in ``dtype``; returns ``(nonfinite, overflow,
        underflow)`` counts."""
        return _accumulate(a, self.n, self.s, self.ss, self.lo, self.hi, OVERFLOW[dtype], UNDERFLOW[dtype])

    def frame(self, key: str) -> pd.DataFrame:
        seen = self.n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(seen, self.s / self.n, np.nan)
            var = np.maximum(self.ss / self.n - mean ** 2, 0)
        parts = split_key(key)
        return pd.DataFrame({"unit": [f"{key}:{i}" for i in range(len(mean))], "key": key,
                             "index": np.arange(len(mean)), "module": parts["module"], "layer": parts["layer"],
                             "reverse": parts["reverse"], "kind": parts["kind"], "mean": mean,
                             "std": np.where(seen, np.sqrt(var), np.nan),
                             "min": np.where(seen, self.lo, np.nan), "max": np.where(seen, self.hi, np.nan),
                             # the sufficient statistics, so the shards of a sharded Run merge exactly
                             "count": self.n, "sum": self.s, "sum_sq": self.ss})
