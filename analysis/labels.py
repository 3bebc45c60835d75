"""The neuron search's label columns and their products with a key's values and ranks.

For one part of the text, ``Labels`` holds every column the search multiplies: each continuous
feature and its circular shifts (``x``, multiplied by the unit's centred values), each binary feature
and its shifts and each continuous feature's ranks (``r``, multiplied by the unit's mid-ranks). Most
of them change on few rows: a binary feature comes in runs, a depth or an indent changes at a few
characters a line, a column or a distance to the line's end changes its slope twice a line. Such a
column is multiplied through its changes (``kernels.ranks_and_sums``: with ``P(t)`` a unit's running
sum, one multiply-add per change and unit), not as a dense column of a product; the rest are dense,
multiplied in the kernel when few, else by BLAS. Every product is float64, taken on the feature's own
values (integers for the built-ins: their changes are exact) and centred and scaled afterwards
(``assemble``), so each equals a float64 product with the normalised column; the float32 products
this replaces were 1e-8 off in a score.

``block(p0, p1)`` gives the kernel one block's share of the columns; ``run_block`` runs a block of
rows through the kernel and BLAS; ``assemble`` turns the accumulators into the ``[units, columns]``
products in the logical column order that ``slots`` index.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import ThreadpoolController

from . import kernels
from .nulls import shifted

# A column that changes on at most this share of its rows (or, for an ``x`` column, changes its slope
# on at most this share) goes through its changes: a change costs about what a dense column costs on
# one row in the kernel (one multiply-add per unit), where BLAS costs a fifth of that a row but needs
# the block's values written out for it first.
SPARSE = 1 / 8
# At most this many dense columns of a kind are multiplied in the kernel, as columns that change on every
# row; more go to BLAS (which needs the block's values written out for it, a cost of its own).
IN_KERNEL = 4

_NO_VALUES = np.zeros((1, 1), np.float32)       # a float16 key's values come from its bits
_POOL = ThreadPoolExecutor(2, thread_name_prefix="rnnscope-products")
_BLAS: list = []


@contextmanager
def single_blas():
    """BLAS at one thread (the pool splits its products instead): after a product its threads spin
    for work, and the numba kernel that runs next on the same cores ran at half speed (1.19 s
    against 0.62 on 300,000 steps x 1,024 units)."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


def ranks(f: np.ndarray) -> np.ndarray:
    """``stats.rankdata(f)`` (average ranks, float64): by counting when ``f`` holds few distinct
    integers (a depth, a column, an indent: no sort of the whole part), else rankdata itself."""
    if len(f) and f.max() - f.min() < 4 * len(f) + 1024 and np.array_equal(f, np.floor(f)):
        at = (f - f.min()).astype(np.int64)
        counts = np.bincount(at)
        mid = np.cumsum(counts) - (counts - 1) / 2            # half-integers: exact, as rankdata's
        return mid[at]
    return stats.rankdata(f)


def _changes(col: np.ndarray) -> np.ndarray | None:
    """The rows ``t >= 1`` where ``col[t] != col[t - 1]``; None when ``col`` has NaN or Inf and is not
    NaN throughout (a NaN column never changes, and makes its products NaN)."""
    if not np.isfinite(col).all():
        return np.zeros(0, np.int64) if np.isnan(col).all() else None
    return np.flatnonzero(col[1:] != col[:-1]) + 1


class Labels:
    """Label columns for one part of the text (``n`` rows). Logically ``X [n, nx]``: each continuous
    feature centred and scaled to norm 1, then its shifts (zeros where the feature is constant on the
    part); ``R [n, nr]``: each binary feature and its shifts, and each continuous feature's centred,
    normalised ranks (NaN where constant); ``slots`` index them. Held as each column's raw values
    (``centre``, ``scale``: what ``assemble`` takes off), by kind of column:

    - ``x1``, ``r1``: few changes, kept as them (rows, column, change), and each column's values;
    - ``x2``: few changes of slope (a ramp), kept as the whole column (float64);
    - ``xd``, ``rd``: dense, kept whole, multiplied by BLAS; at most ``IN_KERNEL`` of a kind go to ``x1`` /
      ``r1`` instead (as columns that change on every row).
    """

    def __init__(self, F: pd.DataFrame, binary: list[str], shifts: int, segments=None):
        self.n = n = len(F)
        self.slots = {}
        wide = {"x": sum(1 + shifts for c in F.columns if c not in binary),
                "r": sum(1 + shifts if c in binary else 1 for c in F.columns)}
        # at most every column whole: rows never written are never touched (no memory); one feature's
        # columns at a time (all of them as float64 at 700,000 rows would be 1 GB)
        whole = {"xd": np.empty((wide["x"], n)), "x2": np.empty((wide["x"], n)), "rd": np.empty((wide["r"], n))}
        got = {g: [] for g in ("x1", "x2", "xd", "r1", "rd")}          # logical indexes, in each group's order
        ones = {"x": {"rows": [], "value": [], "step": [], "first": []},
                "r": {"rows": [], "value": [], "step": [], "first": []}}
        centre, scale = {"x": [], "r": []}, {"x": [], "r": []}
        count = {"x": 0, "r": 0}

        def by_changes(kind: str, j: int, col: np.ndarray, at: np.ndarray) -> None:
            got[f"{kind}1"].append(j)
            one = ones[kind]
            one["rows"].append(at)
            one["value"].append(col[at])
            one["step"].append(col[at] - col[at - 1])
            one["first"].append(col[0] if n else 0.0)

        def add(kind: str, cols, mean: float = 0.0, norm: float = 1.0) -> None:
            for col in cols:
                j = count[kind]
                count[kind] += 1
                centre[kind].append(mean)
                scale[kind].append(norm)
                at = _changes(col)
                if at is not None and len(at) <= SPARSE * n:
                    by_changes(kind, j, col, at)
                    continue
                slope = None if at is None or kind == "r" else np.count_nonzero(np.diff(col, 2))
                group = f"{kind}2" if slope is not None and slope <= SPARSE * n else f"{kind}d"
                whole[group][len(got[group])] = col
                got[group].append(j)

        for name in F.columns:
            f = F[name].to_numpy(np.float64)
            if name in binary:
                self.slots[name] = ("r", count["r"])
                add("r", shifted(f, shifts, segments).T)
                continue
            mean = f.mean()
            norm = np.sqrt(((f - mean) ** 2).sum())
            self.slots[name] = ("x", count["x"])
            # the values less a whole number near their mean (an integer feature's values and changes stay
            # exact, and what assemble takes off is under 1: a feature near 1e12 lost 9 digits to it)
            near = np.round(mean)
            if norm > 0:
                add("x", shifted(f - near, shifts, segments).T, mean - near, norm)
            else:                   # constant on this part: zeros, no score (NaN -> 0 as before)
                add("x", np.zeros((1 + shifts, n)))
            rk = ranks(f)
            rmean = rk.mean()
            rnorm = np.sqrt(((rk - rmean) ** 2).sum())
            self.slots[name + "\0rank"] = ("r", count["r"])
            # a unit's mid-ranks are centred on the part, so they sum to zero: no centring to take off (the
            # ranks less a whole number near their mean only keep the running sums' terms small)
            add("r", [rk - np.round(rmean)] if rnorm > 0 else [np.full(n, np.nan)], 0.0, rnorm if rnorm > 0 else 1.0)
        for kind in "xr":          # a few dense columns go through their changes too (every row): no BLAS
            group, dense = got[f"{kind}d"], whole[f"{kind}d"]
            if len(group) <= IN_KERNEL and all(np.isfinite(dense[i]).all() for i in range(len(group))):
                for i, j in enumerate(group):
                    by_changes(kind, j, dense[i], _changes(dense[i]))
                got[f"{kind}d"] = []
        self.nx, self.nr = count["x"], count["r"]
        self.groups = {g: np.array(v, np.int64) for g, v in got.items()}
        self.centre = {k: np.array(v) for k, v in centre.items()}
        self.scale = {k: np.array(v) for k, v in scale.items()}
        self.whole = {g: whole[g][:len(got[g])] for g in whole}
        self.blas = {k: len(got[f"{k}d"]) > 0 for k in "xr"}       # what is left dense goes to BLAS
        self._ones = {}
        for kind, one in ones.items():
            join = lambda a, dtype: np.concatenate(a) if a else np.zeros(0, dtype)      # noqa: E731
            rows = join(one["rows"], np.int64)
            which = join([np.full(len(at), i, np.int64) for i, at in enumerate(one["rows"])], np.int64)
            order = np.argsort(rows, kind="stable")
            # by row, for the kernel; by column (each column's rows in order), for a column's value at a row
            self._ones[kind] = ((rows[order], which[order], join(one["step"], np.float64)[order]),
                                (np.cumsum([0] + [len(at) for at in one["rows"]]), rows,
                                 join(one["value"], np.float64), np.array(one["first"], np.float64)))
        self._blocks: dict = {}

    def block(self, p0: int, p1: int) -> tuple:
        """The kernel's share of rows ``[p0, p1)`` (``kernels.ranks_and_sums``, from ``x1row``): the
        changes inside the block (block-relative rows) and each column's value on its last row; the
        slope changes of the ``x2`` columns and their two end coefficients."""
        if (p0, p1) not in self._blocks:
            out = []
            for kind in "xr":
                (rows, which, step), (ptr, crow, value, first) = self._ones[kind]
                lo, hi = np.searchsorted(rows, [p0 + 1, p1])
                end = first.copy()
                for c in range(len(first)):
                    i = np.searchsorted(crow[ptr[c]:ptr[c + 1]], p1 - 1, "right")
                    if i:
                        end[c] = value[ptr[c] + i - 1]
                out += [rows[lo:hi] - p0, which[lo:hi], step[lo:hi], end]
                if kind == "x":
                    out += _slopes(self.whole["x2"][:, p0:p1])
            self._blocks[(p0, p1)] = tuple(out)
        return self._blocks[(p0, p1)]


def _slopes(cols: np.ndarray) -> list:
    """Of ramps ``cols [k, m]``, each span of ``kernels.SLOPE`` rows on its own (the sums' terms grow as the
    square of the rows they span: over a block of 16,384 rows a product was 1e-9 off): the rows ``u``
    where a slope changes, two or more into their span, sorted (block-relative); their columns; the
    changes ``f(u) - 2 f(u-1) + f(u-2)``; and ``coef [spans, 2, k]``, per span and column ``c0 = f(t0) -
    sum of change * (u - t0 - 1)`` and ``c1``, the span's last slope. Over a span starting at ``t0``,
    ``sum_r y_r f(r) = Y c0 + W c1 - sum_u change (Q(u) - (u - t0 - 1) P(u))``, with ``Y, W`` the sums of
    ``y`` and ``(r - t0) y`` over the span and ``P, Q`` those before row ``u``."""
    k, m = cols.shape
    S = kernels.SLOPE
    spans = max(1, -(-m // S))
    coef = np.zeros((spans, 2, k))
    if k == 0 or m == 0:
        z = np.zeros(0, np.int64)
        return [z, z, np.zeros(0), coef]
    second = np.diff(cols, 2, axis=1) if m > 2 else np.zeros((k, 0))
    col, at = np.nonzero(second)
    u = at + 2
    keep = u % S >= 2               # a change at a span's first two rows is in its c0 and c1
    col, u = col[keep], u[keep]
    step = second[col, u - 2]
    span = u // S
    starts = np.arange(spans) * S
    ends = np.minimum(starts + S, m)
    coef[:, 0] = cols[:, starts].T
    coef[:, 0] -= np.bincount(span * k + col, step * (u - starts[span] - 1), minlength=spans * k).reshape(spans, k)
    two = ends - starts >= 2
    coef[two, 1] = (cols[:, ends[two] - 1] - cols[:, ends[two] - 2]).T
    order = np.argsort(u, kind="stable")
    return [u[order].astype(np.int64), col[order].astype(np.int64), step[order], coef]


def accumulators(labels: Labels, U: int, width: int) -> dict:
    """Zeroed accumulators of one key's products with ``labels``' columns (per group; ``[columns, units]``
    from the kernel, ``[units, columns]`` from BLAS) and the float64 ``[units, width]`` buffers the kernel
    writes for BLAS, where a kind has dense columns (one pair per part: fresh arrays per chunk cost more
    in page faults than the kernel)."""
    g = labels.groups
    acc = {name: np.zeros((len(g[name]), U)) for name in ("x1", "x2", "r1")}
    for kind in "xr":
        acc[f"{kind}d"] = np.zeros((U, len(g[f"{kind}d"])))
        acc[f"{kind}_t"] = np.empty((U, width if labels.blas[kind] else 1))
    return acc


def run_block(raw, p0: int, labels: Labels, mid, ref, s1, s2, bad, acc: dict, share=None) -> None:
    """One block ``raw [rows, units]`` at position ``p0`` of the part, under ``single_blas``: the kernel
    (sums, ranks, the products in it) and BLAS's products, split over the pool's two threads by units.
    ``share``: ``labels.block`` of these rows, when the caller holds it instead (a cluster's worker)."""
    p1 = p0 + len(raw)
    decode = raw.dtype == np.float16
    # a float32 Run's rows come read-only from the memory map: the kernel gets a plain copy
    xin = _NO_VALUES if decode else np.array(raw, np.float32, order="C")
    b = labels.block(p0, p1) if share is None else share
    U = len(ref)
    kernels.ranks_and_sums(kernels.float16_bits(raw), xin, decode, kernels.VALUE_OF, mid, ref, s1, s2, bad,
                           *b[0:4], acc["x1"], *b[4:8], acc["x2"], *b[8:12], acc["r1"],
                           acc["x_t"], acc["r_t"], labels.blas["x"], labels.blas["r"])
    m = p1 - p0
    jobs = [(acc[f"{k}d"][h], acc[f"{k}_t"][h, :m], labels.whole[f"{k}d"][:, p0:p1])
            for k in "xr" if labels.blas[k] for h in _halves(U)]
    list(_POOL.map(lambda job: np.add(job[0], job[1] @ job[2].T, out=job[0]), jobs))


def _halves(U: int) -> list[slice]:
    return [slice(0, U // 2), slice(U // 2, U)] if U > 1 else [slice(0, U)]


def assemble(labels: Labels, acc: dict, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``xc [units, nx]``, ``rc [units, nr]``: the products with the normalised columns, in the logical
    order. ``s1``: each unit's sum of centred values over the part (what a column's centre multiplies)."""
    g, out = labels.groups, []
    for kind in "xr":
        full = np.empty((len(s1), labels.nx if kind == "x" else labels.nr))
        for name in ([f"{kind}1", f"{kind}2"] if kind == "x" else [f"{kind}1"]) + [f"{kind}d"]:
            a = acc[name]
            full[:, g[name]] = a if name.endswith("d") else a.T
        centre = labels.centre[kind] if kind == "x" else np.zeros(labels.nr)     # mid-ranks sum to zero
        with np.errstate(invalid="ignore"):
            out.append((full - s1[:, None] * centre[None, :]) / labels.scale[kind][None, :])
    return out[0], out[1]
