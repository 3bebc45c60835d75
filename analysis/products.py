"""Products of a unit's values and ranks with the circularly shifted feature columns, from running sums.

The built-in features are piecewise constant (depths, indentation, the binary spans) or linear with
one slope between a few jumps (``column``, ``to_line_end``): a column ``v [n]`` is ``beta * t + h``
with ``h`` constant between its jumps ``j`` (``beta`` an integer, so ``h`` is exact). For any series
``d [n]``, with ``D_j = sum_{t<j} d_t``:

    sum_t d_t v_t = beta * sum_t t d_t + h[n-1] * D_n - sum_j (h[j] - h[j-1]) * D_j

so a product needs the running sum at each jump only, O(jumps) per unit instead of O(n), and a
circular shift only moves the jumps (and adds the wrap). ``kernels.ranks_and_products`` keeps the
running sums of the mid-ranks and of ``d = x - ref`` and adds them at every jump of every column;
the sums are float64 in row order (mid-ranks are half-integers: their sums are exact). On the
benchmark's C text (200,000 characters, 16 shifts) the 16 shifts of all nine features have about
2.5 jumps per row in all, against 176 multiply-adds per row for the dense float32 products they
replace. A column with more than ``n / DENSE`` jumps (a feature that changes at almost every step,
the ranks of ``column``) is multiplied densely in the same kernel, in float64.

Every column is used raw and normalised after: ``sum d (v - mu) / norm = (sum d v - mu D_n) / norm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE = 8       # past n / DENSE jumps a column's jumps cost more than its dense product in the kernel


@dataclass
class Plan:
    """What the kernel needs for one part: events sorted by position (``epos``), each adding
    ``ewx * (sum of d) + ewr * (sum of ranks)`` before that row to column ``ecol`` (X columns first,
    then R columns); the dense columns ``DX [kx, n]``, ``DR [kr, n]``; and per column its slope,
    last value ``h[n-1]`` and dense index (-1 when sparse)."""
    epos: np.ndarray
    upos: np.ndarray
    eu: np.ndarray
    ecol: np.ndarray
    ewx: np.ndarray
    ewr: np.ndarray
    DX: np.ndarray
    DR: np.ndarray
    x_beta: np.ndarray
    x_last: np.ndarray
    x_dense: np.ndarray
    r_last: np.ndarray
    r_dense: np.ndarray


def slope(f: np.ndarray) -> float:
    """The integer step most common between neighbours of ``f`` (0 if that step is not an integer)."""
    if len(f) < 2:
        return 0.0
    steps, counts = np.unique(np.diff(f), return_counts=True)
    best = float(steps[np.argmax(counts)])
    return best if best == round(best) and abs(best) < 2.0 ** 20 else 0.0


def _jumps(V: np.ndarray, beta: float):
    """``V [n, k]`` -> (h[n-1] per column, which columns are dense, and the sparse columns' jumps
    as (position, column, size) in position order)."""
    n = len(V)
    H = V - beta * np.arange(n, dtype=np.float64)[:, None] if beta else V
    dH = np.diff(H, axis=0)
    nz = dH != 0
    dense = nz.sum(0) > max(n // DENSE, 1)
    nz[:, dense] = False
    rows, cols = np.nonzero(nz)
    return H[-1].copy(), dense, rows + 1, cols, dH[rows, cols]


def plan(xcols: list, rcols: list, n: int) -> Plan:
    """``xcols``: ``(V [n, k], beta)`` blocks of raw X columns (multiplied by d); ``rcols``: ``V [n, k]``
    blocks of raw R columns (multiplied by the ranks)."""
    pos, col, wx, wr = [], [], [], []
    x_beta, x_last, x_dense, r_last, r_dense, DX, DR = [], [], [], [], [], [], []
    cx = sum(V.shape[1] for V, _ in xcols)
    for space, blocks in (("x", [(V, b) for V, b in xcols]), ("r", [(V, 0.0) for V in rcols])):
        at = 0 if space == "x" else cx
        dense_cols = DX if space == "x" else DR
        last_of, dense_of = (x_last, x_dense) if space == "x" else (r_last, r_dense)
        for V, beta in blocks:
            last, dense, p, c, w = _jumps(V, beta)
            pos.append(p)
            col.append(c + at)
            (wx if space == "x" else wr).append(w)
            (wr if space == "x" else wx).append(np.zeros(len(w)))
            if space == "x":
                x_beta.append(np.full(V.shape[1], beta))
            last_of.append(last)
            k = sum(D.shape[1] for D in dense_cols)
            dense_of.append(np.where(dense, k + np.cumsum(dense) - 1, -1))
            if dense.any():
                dense_cols.append(V[:, dense])
            at += V.shape[1]
    pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    order = np.argsort(pos, kind="stable")
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)   # noqa: E731
    dense_block = lambda Ds: np.ascontiguousarray(np.concatenate(Ds, 1).T) if Ds else np.zeros((0, n))  # noqa: E731
    pos = pos.astype(np.int64)[order]
    upos, eu = np.unique(pos, return_inverse=True)
    return Plan(pos, upos, eu.ravel().astype(np.int64), cat(col, np.int64)[order], cat(wx, np.float64)[order],
                cat(wr, np.float64)[order], dense_block(DX), dense_block(DR), cat(x_beta, np.float64),
                cat(x_last, np.float64), cat(x_dense, np.int64), cat(r_last, np.float64), cat(r_dense, np.int64))


def raw_products(p: Plan, s1, tx, tr, acc, dxacc, dracc) -> tuple[np.ndarray, np.ndarray]:
    """``[units, X columns]`` sums of d times each raw X column, ``[units, R columns]`` of the ranks
    times each raw R column, from the kernel's sums (``s1``, ``tx``, ``tr [units]``), its event sums
    ``acc [columns, units]`` and dense products ``dxacc``, ``dracc [k, units]``."""
    cx = len(p.x_beta)
    xs = p.x_beta * tx[:, None] + p.x_last * s1[:, None] - acc[:cx].T
    rs = p.r_last * tr[:, None] - acc[cx:].T
    for out, idx, dacc in ((xs, p.x_dense, dxacc), (rs, p.r_dense, dracc)):
        d = idx >= 0
        out[:, d] = dacc[idx[d]].T
    return xs, rs
