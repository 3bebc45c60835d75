"""Compiled inner loops of the streaming neuron search (numba): a per-unit histogram of values
binned on their float16 bit pattern, and the mid-rank lookup with per-unit sums.

Both walk ``[rows, units]`` arrays in blocks of 32 units (one 64-byte cache line of float16 per
row), one block per thread, so each thread owns its units' counters and no two threads write the
same memory. Written as loops because they are loops: numpy would spend five passes and a
16 MB scatter per chunk where this spends one.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

BINS = 8192          # ordering key of the float16 bit pattern, top 13 of 16 bits
BLOCK = 32


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


@njit(parallel=True, cache=True, boundscheck=False)
def histogram(bits, bin_of, counts):
    """``counts[unit, bin] += 1`` for every value; ``bits [rows, units]`` uint16."""
    R, U = bits.shape
    for blk in prange((U + BLOCK - 1) // BLOCK):
        u0 = blk * BLOCK
        u1 = min(U, u0 + BLOCK)
        for r in range(R):
            for j in range(u0, u1):
                counts[j, bin_of[bits[r, j]]] += 1


@njit(parallel=True, cache=True, boundscheck=False)
def ranks_and_sums(bits, x, decode, bin_of, value_of, midrank, ref, out, s1, s2, bad):
    """``out[r, j] = midrank[j, bin(x[r, j])]``; ``s1, s2 += sum of (x - ref), (x - ref)^2`` per unit
    (float64, centred on ``ref`` so saturated gates keep their variance); ``bad[j]`` once a value is
    NaN or Inf. With ``decode`` the values are float16 ``bits`` and are written into ``x`` as float32
    (a table lookup, cheaper than a conversion pass); otherwise ``x`` holds them already."""
    R, U = bits.shape
    for blk in prange((U + BLOCK - 1) // BLOCK):
        u0 = blk * BLOCK
        u1 = min(U, u0 + BLOCK)
        for r in range(R):
            for j in range(u0, u1):
                b = bits[r, j]
                out[r, j] = midrank[j, bin_of[b]]
                if decode:
                    v = value_of[b]
                    x[r, j] = v
                else:
                    v = x[r, j]
                if np.isfinite(v):
                    d = v - ref[j]
                    s1[j] += d
                    s2[j] += d * d
                else:
                    bad[j] = True
