"""Compiled inner loops of the streaming neuron search (numba): a per-unit histogram of values
binned on their float16 bit pattern, and the mid-rank lookup with per-unit sums and the products
with the label columns (``labels``).

Both walk ``[rows, units]`` arrays in blocks of units (the ranks 32, one 64-byte cache line of
float16 per row; the histogram 8, see ``HBLOCK``), one block per thread, so each thread owns its
units' counters and no two threads write the same memory. Each block goes over the rows in tiles of
512, and each unit of the block runs down its own values in the tile with its counters or mid-ranks
in L1: row by row over the 32 units scatters each row into 32 tables of 32-64 KB (1-2 MB, past L2).
The histogram first copies the tile into a small local buffer, one row of it per unit (its stride
padded off a power of two). The ranks read each unit's column of the tile where it lies (the tile's
512 row segments, 32 KB, stay in L2 across its 32 units; the copy had cost more than the
look-ups) and write its mid-ranks and values into ``[rows, units]`` buffers, which then go down the
tile's rows, 32 units at once, for the running sums the products are taken from
(``ranks_and_sums``): 5.4 against 9.7 ns a value a thread with the copy, the same sums to the bit
(``benchmarks/ranks_kernel.py``).
Written as loops because they are loops: numpy would spend five passes and a 16 MB scatter per
chunk where this spends one.
"""
from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BINS = 8192          # ordering key of the float16 bit pattern, top 13 of 16 bits
SLOPE = 64           # rows a ramp's running sums span before they start again (a divisor of TILE)
BLOCK = 32
TILE = 512           # rows per tile (the ranks' buffers 2 x 512 x 32 x 4 bytes = 128 KB, L2)
PAD = 24             # the histogram's stride 536 elements, not 512: rows 1 KB apart share a few cache sets
# The histogram's block: 8 units, not 32. Its counters are 32 KB a unit, so 32 units cycle 1 MB of
# them through the cache every tile (past L2); 8 cycle 256 KB. On 70,000 rows x 512 float16 units
# (one thread, CPU time, the benchmark's AR(1) states) 8 gave 2.3 ns a value against 5.3 for 32
# (16: 4.2, 4: 2.8; tiles of 512 to 4096 rows the same). The ranks kernel's tables are the same size
# but it gained nothing from smaller blocks (4.6 ns either way): its stores bound it.
HBLOCK = 8


def _bin_table() -> np.ndarray:
    u = np.arange(1 << 16, dtype=np.uint32)
    ordered = np.where(u >= 0x8000, 0xFFFF - u, u | 0x8000)     # negatives reversed, below positives
    return (ordered >> 3).astype(np.int32)


BIN_OF = _bin_table()           # float16 bits -> bin, monotone non-decreasing in the value
VALUE_OF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _native_half() -> bool:
    """Whether the code numba compiles converts float16 itself (x86's F16C, any 64-bit ARM): LLVM then
    lowers ``_half`` to one instruction; without it LLVM calls ``__extendhfsf2``, which numba's JIT does
    not have (the process aborts), so the table is used. What counts is numba's target, not the host:
    ``NUMBA_CPU_NAME=generic`` (portable caches) or ``NUMBA_CPU_FEATURES`` without ``+f16c`` compile for a
    CPU without it. The table is used too with ``RNNSCOPE_FLOAT16_TABLE=1`` where the kernels are
    compiled afresh (numba's cache keys on the CPU, not on this choice; the tests set it with a cache of
    their own); either way the results are the same to the bit."""
    if os.environ.get("RNNSCOPE_FLOAT16_TABLE") == "1":
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        from numba.core import config
        if config.CPU_FEATURES is not None:             # numba compiles for these features, not the host's
            return "+f16c" in config.CPU_FEATURES.replace(" ", "").split(",")
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:       # noqa: BLE001 - no way to ask: the table is always right
        return False


NATIVE_HALF = _native_half()


@intrinsic
def _half(typingctx, b):
    """float16 bits (uint16) -> float32, as the CPU's own conversion (``VALUE_OF[b]`` without its 256 KB
    table, whose look-ups competed with the mid-ranks' for the cache: 7 % of the ranks kernel)."""
    if isinstance(b, types.Integer) and b.bitwidth == 16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(b), codegen
    return None


def float16_bits(x: np.ndarray) -> np.ndarray:
    """``[rows, units]`` -> uint16 bit patterns of the values as float16 (a view when they are)."""
    if x.dtype != np.float16:
        with np.errstate(over="ignore"):
            x = x.astype(np.float16)
    return np.ascontiguousarray(x).view(np.uint16)


@njit(inline="always")
def _bin(b):
    """``BIN_OF[b]`` without the table: the ordering key's top 13 bits (one fewer random load)."""
    b = np.int32(b)
    return ((0xFFFF - b) if b >= 0x8000 else (b | 0x8000)) >> 3


@njit(inline="always")
def _load(bits, r0, m, u0, w, lb):
    """Tile ``[r0, r0 + m) x [u0, u0 + w)`` of ``bits`` into the histogram's buffer, one row per unit."""
    for i in range(m):
        for k in range(w):
            lb[k, i] = bits[r0 + i, u0 + k]


@njit(parallel=True, cache=True, boundscheck=False)
def histogram(bits, counts):
    """``counts[unit, bin] += 1`` for every value; ``bits [rows, units]`` uint16, ``counts
    [units, BINS]`` int32 (a part has fewer than 2^31 rows; half the cache of int64)."""
    R, U = bits.shape
    for blk in prange((U + HBLOCK - 1) // HBLOCK):
        u0 = blk * HBLOCK
        w = min(U, u0 + HBLOCK) - u0
        lb = np.empty((HBLOCK, TILE + PAD), np.uint16)
        for r0 in range(0, R, TILE):
            m = min(R, r0 + TILE) - r0
            _load(bits, r0, m, u0, w, lb)
            for k in range(w):
                c = counts[u0 + k]
                for i in range(m):
                    c[_bin(lb[k, i])] += 1


@njit(boundscheck=False)
def _lookups(bits, xin, decode, value_of, midrank, ref, u0, w, m, r0, ld, lr, x_t, ranks_t, write_x, write_r):
    """Per unit of a tile, straight down its rows of ``bits`` (uint16, as ``float16_bits`` gives them; the
    tile's 64-byte row segments stay in L2 across its 32 units): its mid-ranks and values into its
    column of ``lr``, ``ld [rows, 32 units]`` float32, for ``_rows``; and its centred values and ranks
    into ``x_t``, ``ranks_t`` for BLAS."""
    for k in range(w):
        j = u0 + k
        mr = midrank[j]
        if decode:
            for i in range(m):
                b = bits[r0 + i, j]
                lr[i, k] = mr[_bin(b)]
                ld[i, k] = _half(b) if NATIVE_HALF else value_of[b]
        else:
            for i in range(m):
                lr[i, k] = mr[_bin(bits[r0 + i, j])]
                ld[i, k] = xin[r0 + i, j]
        if write_x:
            c = ref[j]
            for i in range(m):
                x_t[j, r0 + i] = ld[i, k] - c
        if write_r:
            for i in range(m):
                ranks_t[j, r0 + i] = lr[i, k]


@njit(boundscheck=False)
def _spans(b2, tx, tq, coef, span):
    """A span's ramps: ``b2 += Y c0 + W c1`` (``coef [spans, 2, columns]``), and its sums start again."""
    for q in range(b2.shape[0]):
        a0, a1 = coef[span, 0, q], coef[span, 1, q]
        for k in range(b2.shape[1]):
            b2[q, k] += tx[k] * a0 + tq[k] * a1
    tx[:] = 0.0
    tq[:] = 0.0


@njit(boundscheck=False)
def _rows(ld, lr, c, m, r0, e1, f1, x1row, x1col, x1del, b1, e2, f2, x2row, x2col, x2del, x2c0, b2,
          er, fr, r1row, r1col, r1del, c1, px, tx, tq, pr, a1, a2, nf):
    """Down a tile's rows, the 32 units at once: at each row the changes there (before its terms), then
    the running sums of the values centred on ``c`` and of the ranks."""
    B = ld.shape[1]
    for i in range(m):
        row = r0 + i
        while e1 < f1 and x1row[e1] == row:
            q, dd = x1col[e1], x1del[e1]
            for k in range(B):
                b1[q, k] -= dd * px[k]
            e1 += 1
        local = i % SLOPE
        if local == 0 and i:                        # the last span's ramps, and a new span
            _spans(b2, tx, tq, x2c0, (r0 + i) // SLOPE - 1)
        while e2 < f2 and x2row[e2] == row:
            q, dd = x2col[e2], x2del[e2]
            for k in range(B):
                b2[q, k] -= dd * (tq[k] - (local - 1) * tx[k])
            e2 += 1
        while er < fr and r1row[er] == row:
            q, dd = r1col[er], r1del[er]
            for k in range(B):
                c1[q, k] -= dd * pr[k]
            er += 1
        for k in range(B):
            d = ld[i, k] - c[k]
            px[k] += d
            tx[k] += d
            tq[k] += local * d
            pr[k] += lr[i, k]
            fin = np.isfinite(d)
            a1[k] += d if fin else 0.0
            a2[k] += d * d if fin else 0.0
            nf[k] += 0 if fin else 1


@njit(parallel=True, cache=True, boundscheck=False)
def ranks_and_sums(bits, xin, decode, value_of, midrank, ref, s1, s2, bad,
                   x1row, x1col, x1del, x1end, x1acc, x2row, x2col, x2del, x2coef, x2acc,
                   r1row, r1col, r1del, r1end, r1acc, x_t, ranks_t, write_x, write_r):
    """One block of rows: per unit ``s1, s2 += sum of d, d^2`` with ``d = x - ref`` (float64, centred on
    ``ref`` so saturated gates keep their variance), ``bad[j]`` once a value is NaN or Inf; each value's
    mid-rank ``midrank[j, bin(value[r, j])]``; and the products of ``d`` (``x``) and of the ranks (``r``)
    with the label columns (``labels.Labels``), each ``acc [columns, units] +=``, float64:

    - ``x1``, ``r1``: columns multiplied through their changes (those that change on few rows, and a
      few dense ones, which change on every row). With ``P(t)`` the sum of a unit's terms before row
      ``t``, ``sum_r y_r f(r) = P(m) f(m - 1) - sum_t (f(t) - f(t - 1)) P(t)`` over the rows where ``f``
      changes: ``row, col, del`` (block-relative, sorted, none at row 0) and ``end``, each column's
      value on the last row;
    - ``x2``: ramps, through their changes of slope, ``SLOPE`` rows at a time (``labels._slopes``:
      ``row, col, del`` and ``coef [spans, 2, columns]``), with the span's own sums ``P`` and ``Q`` (of
      ``(r - t0) d_r``): their terms grow as the square of the rows they span;
    - with ``write_x`` / ``write_r``, ``x_t`` / ``ranks_t [units, rows]`` get ``d`` / the ranks, for BLAS.

    The running sums and products run across a block's 32 units at once (each unit's look-ups write its
    column of the tile's ``[rows, 32 units]`` buffers), so a change costs one multiply-add per
    unit. The ranks (half-integers) and a binary feature's changes (+-1) make the rank products exact.
    With ``decode`` the values are the float16 ``bits`` (converted by the CPU, ``_half``, where it can:
    no conversion pass); otherwise they are ``xin [rows, units]`` float32."""
    R, U = bits.shape
    nt = (R + TILE - 1) // TILE
    starts = np.arange(nt + 1) * TILE
    t1 = np.searchsorted(x1row, starts)
    t2 = np.searchsorted(x2row, starts)
    tr = np.searchsorted(r1row, starts)
    n1, n2, m1 = x1acc.shape[0], x2acc.shape[0], r1acc.shape[0]
    for blk in prange((U + BLOCK - 1) // BLOCK):
        u0 = blk * BLOCK
        w = min(U, u0 + BLOCK) - u0
        ld = np.zeros((TILE, BLOCK), np.float32)          # the tile's values and ranks, [rows, units]
        lr = np.zeros((TILE, BLOCK), np.float32)          # (past the last unit: zeros)
        c = np.zeros(BLOCK)
        c[:w] = ref[u0:u0 + w]
        px, pr = np.zeros(BLOCK), np.zeros(BLOCK)         # running sums of d and of the ranks over the block
        tx, tq = np.zeros(BLOCK), np.zeros(BLOCK)         # ... of d and (r - t0) d over the tile, for x2
        a1, a2 = np.zeros(BLOCK), np.zeros(BLOCK)
        nf = np.zeros(BLOCK, np.int64)
        b1, b2, c1 = np.zeros((n1, BLOCK)), np.zeros((n2, BLOCK)), np.zeros((m1, BLOCK))
        for t in range(nt):
            r0 = t * TILE
            m = min(R, r0 + TILE) - r0
            _lookups(bits, xin, decode, value_of, midrank, ref, u0, w, m, r0, ld, lr, x_t, ranks_t, write_x, write_r)
            _rows(ld, lr, c, m, r0, t1[t], t1[t + 1], x1row, x1col, x1del, b1, t2[t], t2[t + 1], x2row, x2col, x2del,
                  x2coef, b2, tr[t], tr[t + 1], r1row, r1col, r1del, c1, px, tx, tq, pr, a1, a2, nf)
            _spans(b2, tx, tq, x2coef, (r0 + m - 1) // SLOPE)
        for k in range(w):
            j = u0 + k
            s1[j] += a1[k]
            s2[j] += a2[k]
            if nf[k]:
                bad[j] = True
            for q in range(n1):
                x1acc[q, j] += b1[q, k] + px[k] * x1end[q]
            for q in range(n2):
                x2acc[q, j] += b2[q, k]
            for q in range(m1):
                r1acc[q, j] += c1[q, k] + pr[k] * r1end[q]


@njit(parallel=True, cache=True, boundscheck=False)
def midranks(counts, n, mid, rank_ss):
    """From ``counts [units, BINS]`` of a part of ``n`` rows: ``mid [units, BINS]`` float32, each bin's
    mid-rank centred on the part's mean rank (half-integers: exact in float32 below 2^24 rows), and
    ``rank_ss [units]``, the sum of the squared centred ranks of every row. One pass where numpy
    spent six over ``[units, BINS]`` int64 and float64 arrays."""
    U, B = counts.shape
    centre = (n + 1) / 2
    for j in prange(U):
        cum, ss = 0, 0.0
        for b in range(B):
            c = counts[j, b]
            cum += c
            m = cum - (c - 1) / 2 - centre
            mid[j, b] = m
            ss += c * m * m
        rank_ss[j] = ss
