"""Compiled inner loops of the streaming neuron search (numba): a per-unit histogram of values
binned on their float16 bit pattern, and the mid-rank lookup with per-unit sums.

Both walk ``[rows, units]`` arrays in blocks of units (the ranks 32, one 64-byte cache line of
float16 per row; the histogram 8, see ``HBLOCK``), one block per thread, so each thread owns its units' counters and no two threads write the
same memory. Each block goes over the rows in tiles of 512: the tile is first copied into a small
local buffer, one row of it per unit (its stride padded off a power of two), and then each unit
runs over its own contiguous row with its counters or mid-ranks in L1 and its sums in registers.
The two orders this replaces both miss the cache on nearly every value: row by row over the 32
units scatters each row into 32 tables of 32-64 KB (1-2 MB, past L2); unit by unit straight down
the chunk reads with a stride of 1 KB, which lands in a handful of cache sets. On the benchmark's
float16 states (200,000 steps x 512 units a key, 2 busy cores) the histogram went from 1.2 to 0.6 s
and the ranks from 3.2 to 0.9 s, and every result is bit for bit what it was: each unit's sums add
its rows in the same order. The ranks and values come out transposed, ``[units, rows]``, which is
what the products with the feature columns read, so they are never transposed back.
Written as loops because they are loops: numpy would spend five passes and a 16 MB scatter per
chunk where this spends one.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

BINS = 8192          # ordering key of the float16 bit pattern, top 13 of 16 bits
BLOCK = 32
TILE = 512           # rows per tile: the local buffer is 32 x 536 x 6 bytes = 100 KB (L2)
PAD = 24             # row stride 536 elements, not 512: 32 rows 1 KB apart share a few cache sets
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
def _load(bits, xin, decode, r0, m, u0, w, lb, lv):
    """Tile ``[r0, r0 + m) x [u0, u0 + w)`` into the local buffers, one row per unit."""
    for i in range(m):
        for k in range(w):
            lb[k, i] = bits[r0 + i, u0 + k]
            if not decode:
                lv[k, i] = xin[r0 + i, u0 + k]


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
            _load(bits, bits, True, r0, m, u0, w, lb, lb)
            for k in range(w):
                c = counts[u0 + k]
                for i in range(m):
                    c[_bin(lb[k, i])] += 1


@njit(parallel=True, cache=True, boundscheck=False)
def ranks_and_sums(bits, xin, decode, value_of, midrank, ref, ranks_t, x_t, s1, s2, bad):
    """``ranks_t[j, r] = midrank[j, bin(value[r, j])]`` and ``x_t[j, r]`` the value as float32
    (both ``[units, rows]``, at least ``rows`` wide); ``s1, s2 += sum of (x - ref), (x - ref)^2``
    per unit (float64, centred on ``ref`` so saturated gates keep their variance); ``bad[j]`` once
    a value is NaN or Inf. With ``decode`` the values are the float16 ``bits`` (a table lookup,
    cheaper than a conversion pass); otherwise they are ``xin [rows, units]`` float32."""
    R, U = bits.shape
    for blk in prange((U + BLOCK - 1) // BLOCK):
        u0 = blk * BLOCK
        w = min(U, u0 + BLOCK) - u0
        lb = np.empty((BLOCK, TILE + PAD), np.uint16)
        lv = np.empty((BLOCK, TILE + PAD), np.float32)
        for r0 in range(0, R, TILE):
            m = min(R, r0 + TILE) - r0
            _load(bits, xin, decode, r0, m, u0, w, lb, lv)
            for k in range(w):
                j = u0 + k
                mr, o, xx = midrank[j], ranks_t[j], x_t[j]
                c, a1, a2 = ref[j], s1[j], s2[j]
                nonfinite = False
                for i in range(m):
                    b = lb[k, i]
                    o[r0 + i] = mr[_bin(b)]
                    v = value_of[b] if decode else lv[k, i]
                    xx[r0 + i] = v
                    if np.isfinite(v):
                        d = v - c
                        a1 += d
                        a2 += d * d
                    else:
                        nonfinite = True
                s1[j] = a1
                s2[j] = a2
                if nonfinite:
                    bad[j] = True


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
