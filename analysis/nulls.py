"""Nulls that keep autocorrelation: circular shifts of a feature against a unit, within one part of
the text, and within each document of that part (never across a boundary: the state was reset
there, so a shift that carried one document's feature into the next would pair it with a state
that never saw it, and would break the alignment of each document's level with its feature, which
is not what a null about tracking inside a document should break).

Two resolutions. Every unit gets ``shifts`` (16) evenly spread shifts, streamed with the scores:
cheap, but an empirical p-value cannot go below ``1 / 17`` and the t-interval extrapolates from 16
draws. The few *selected* units get every circular shift of the part (all ``n - 1`` lags), computed
in one FFT per unit and feature: the rank p-value then resolves down to ``1 / n`` and is exact when
the unit is circularly stationary (the observed alignment is one member of the group of shifts).
Leaving out the lags near the observed one looks cautious but is not: on AR(1) 0.98 units that know
nothing, dropping the nearest 5% of lags each side gave 6.5% false positives at 0.05, all lags 5.1%.

Several documents are independent samples, and the null uses them: each document is shifted by
its own lag, drawn independently of every other document's (``independent_test``; the streamed
``shifted`` columns draw them the same way). The group is then every combination of lags, prod n_d
of them, instead of the n_d or so that one common fraction of each document gives. That common
fraction (``circular_scores`` with ``segments``: shift ``s`` moves a document of ``n_d`` steps by
``s * n_d // n``) could not resolve a corpus of short documents: on 400 documents of 30-60 steps
its rank p-value stopped at 1 / (longest document), and because every document moved together a
structure that repeats in each of them (position in the document) came back in every shifted
score, so the null's spread was that of one document, not of 400 (q 0.05 for a unit at r 0.98).
Summed over independent lags, the null's mean and variance are exact sums over the documents (each
document's lags are all known from one FFT); its rank p-value comes from ``DRAWS`` random
combinations. One document is the old test exactly. ``segments`` lists the documents' lengths in order.

With many held-out documents (``BETWEEN``) the held-out test also asks the between-document null
(``between_test``: each document's term is as likely negative as positive), and a unit must pass both:
the shift null keeps autocorrelation inside a document, the sign flips do not need it to be shorter
than a document.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from .kernels import BIN_OF, BINS, float16_bits

DRAWS = 9999          # random combinations of lags behind the rank p-value: it resolves to 1e-4
# held-out documents from which the between-document null is also asked: 2^20 sign patterns resolve far
# below any q that matters, while with a handful of documents it could resolve nothing
BETWEEN = 20
DRAW_BUDGET = 10**7   # draws x documents per test: past 1,000 documents fewer draws (a coarser floor)
SEED = 0              # the lags are drawn, but the table is the same every time


def null_of(segments) -> dict:
    """Which held-out null a part gets, and its resolution: the smallest rank p-value it can give."""
    segs = np.asarray(segments, np.int64)
    if len(segs) == 1:
        return {"null": "every circular shift of the text", "resolution": 1.0 / int(segs[0]), "draws": int(segs[0]) - 1}
    draws = int(min(DRAWS, max(999, DRAW_BUDGET // len(segs))))
    one_in_combos = float(np.exp(-np.log(segs).sum()))    # 1 / prod n_d (prod overflows int64)
    name = "independent circular shifts of each document" + (BETWEEN_NAME if len(segs) >= BETWEEN else "")
    return {"null": name, "draws": draws, "resolution": max(1.0 / (draws + 1), one_in_combos)}


BETWEEN_NAME = ", and sign flips of each document's term (between documents)"

def _segments(n: int, segments) -> list[int]:
    segs = [n] if segments is None else [int(m) for m in segments]
    if sum(segs) != n or min(segs) < 1:
        raise ValueError(f"segments {segs[:8]} do not tile {n} steps")
    return segs


def shifted(col: np.ndarray, shifts: int, segments=None, out: np.ndarray | None = None) -> np.ndarray:
    """``[n] -> [n, 1 + shifts]``: the column, then ``shifts`` circular shifts. One document: spread
    evenly over it (each at least ``n / (shifts + 1)`` steps, far past any local autocorrelation).
    Several (``segments``): each column shifts each document by its own lag, drawn independently.
    ``out``: a ``[n, 1 + shifts]`` array (a slice of a wider one) to write into, cast to its dtype."""
    segs = _segments(len(col), segments)
    if len(segs) == 1:
        offsets = [[int(round(segs[0] * (k + 1) / (shifts + 1))) for k in range(shifts)]]
    else:
        offsets = np.random.default_rng(SEED).integers(0, np.asarray(segs)[:, None], (len(segs), shifts))
    rolled = np.empty((1 + shifts, len(col)), col.dtype if out is None else out.dtype)
    start = 0
    for m, offs in zip(segs, offsets):
        seg, dst = col[start:start + m], rolled[:, start:start + m]
        for k, o in enumerate([0, *offs]):          # np.roll(seg, o), each shift one contiguous row
            o = int(o) % m
            dst[k, o:] = seg[:m - o]
            dst[k, :o] = seg[m - o:]
        start += m
    if out is None:
        return rolled.T
    for r in range(0, len(col), 8192):              # transposed in blocks that stay in cache: writing each
        out[r:r + 8192] = rolled[:, r:r + 8192].T   # shift down a column of a wide array cost 4x more
    return out


def shift_test(scores: np.ndarray, two_sided: bool) -> dict:
    """``scores [units, 1 + k]`` oriented so that larger means stronger (column 0 observed, the rest
    shifted). The p-value treats the k shifted scores as a Gaussian sample of the null: a Student-t
    prediction interval with ``k - 1`` degrees of freedom (the sd itself comes from k draws, so a
    Gaussian tail would be anti-conservative); the empirical rank p-value beside it."""
    obs, null = scores[:, 0], scores[:, 1:]
    k = null.shape[1]
    mu = null.mean(1)
    sd = null.std(1, ddof=1) if k > 1 else np.full(len(obs), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (obs - mu) / sd
        if two_sided:
            beats = np.abs(null - mu[:, None]) >= np.abs(obs - mu)[:, None]
            p = 2 * stats.t.sf(np.abs(z) / np.sqrt(1 + 1 / k), max(k - 1, 1))
        else:
            beats = null >= obs[:, None]
            p = stats.t.sf(z / np.sqrt(1 + 1 / k), max(k - 1, 1))
    p_emp = (1 + beats.sum(1)) / (1 + k)
    bad = ~np.isfinite(obs)
    p[bad], p_emp[bad] = np.nan, np.nan
    return {"null_mean": mu, "null_std": sd, "z": z, "p": p, "p_empirical": p_emp}


def _pair(x: np.ndarray, f: np.ndarray, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a score multiplies: the unit's mid-ranks (at the streamed search's float16 bins, O(n),
    as the kernels do) and the feature for an AUC; both centred for a Pearson r."""
    if binary:
        b = BIN_OF[float16_bits(x[:, None])[:, 0]]
        counts = np.bincount(b, minlength=BINS)
        return (np.cumsum(counts) - (counts - 1) / 2)[b], f.astype(np.float64)
    return x.astype(np.float64) - x.mean(), f - f.mean()


def circular_scores(x: np.ndarray, f: np.ndarray, binary: bool, segments=None) -> np.ndarray:
    """Score of one unit ``x [n]`` against the feature ``f [n]`` circularly shifted by every lag:
    ``out[s]`` is the AUC (ranks at the streamed search's float16 resolution, ties half) or the
    Pearson r of ``x`` against ``np.roll(f, s)``, each document of ``segments`` rolled by its share
    of ``s``. One FFT cross-correlation per document, O(n log n)."""
    n = len(x)
    v, g = _pair(x, f, binary)
    c, start = np.zeros(n), 0
    for m in _segments(n, segments):     # sum_t v[t] g[t - s_d mod n_d], within each document
        cd = np.fft.irfft(np.fft.rfft(v[start:start + m]) * np.conj(np.fft.rfft(g[start:start + m])), m)
        c += cd[np.arange(n) * m // n]
        start += m
    if binary:
        n1 = f.sum()
        if n1 == 0 or n1 == n:           # the feature never (or always) holds on this part: no AUC
            return np.full(n, np.nan)
        return (c - n1 * (n1 + 1) / 2) / (n1 * (n - n1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / np.sqrt((v ** 2).sum() * (g ** 2).sum())


def resolved_test(x: np.ndarray, f: np.ndarray, binary: bool, direction: int, segments=None) -> dict:
    """One-sided test of one unit on one part against every circular shift of the feature, in the
    ``direction`` chosen on the selection part. ``p_empirical`` is the rank p-value over the whole
    group of shifts (exact, floored at ``1 / n``); ``p`` is ``shift_test``'s t-interval, now from
    ``n - 1`` shifts: the null's sd is that of every lag, not of 16 draws, so it no longer depends
    on which shifts happened to be drawn, and the tail resolves p below ``1 / n``."""
    s = circular_scores(x, f, binary, segments)
    o = (1 - s if direction < 0 else s) if binary else direction * s
    res = shift_test(o[None, :], two_sided=False)
    return {"score": s[0], "shifts": len(s) - 1, **{k: v[0] for k, v in res.items()}}


def draw_lags(segments, draws: int) -> np.ndarray:
    """``[draws, documents]`` positions into a part's flat per-document lag table: each row one
    combination of lags, each document's drawn independently and uniformly."""
    segs = np.asarray(segments, np.int64)
    starts = np.r_[0, np.cumsum(segs)[:-1]]
    rng = np.random.default_rng(SEED)
    return starts + (rng.random((draws, len(segs))) * segs).astype(np.int64)


def independent_test(x: np.ndarray, f: np.ndarray, binary: bool, direction: int, segments,
                     lags: np.ndarray) -> dict:
    """One-sided test of one unit ``x [n]`` against ``f [n]`` over several documents, each shifted
    by its own lag. The score is linear in the sum over documents of each one's cross-product at
    its lag, so the null's mean and variance are exact sums of each document's mean and variance
    over its lags (``p``: the Gaussian tail, a sum of many independent terms); ``p_empirical`` is
    the rank p-value over the combinations ``lags`` (``draw_lags``), floored at ``1 / (draws + 1)``."""
    segs = np.asarray(_segments(len(x), segments), np.int64)
    starts = np.r_[0, np.cumsum(segs)[:-1]]
    n = len(x)
    v, g = _pair(x, f, binary)
    flat = np.empty(n)                   # flat[start_d + s] = sum_t v[t] g[t - s], inside document d
    for a, m in zip(starts, segs):
        flat[a:a + m] = np.fft.irfft(np.fft.rfft(v[a:a + m]) * np.conj(np.fft.rfft(g[a:a + m])), m)
    mean_d = np.add.reduceat(flat, starts) / segs
    var_d = np.add.reduceat((flat - np.repeat(mean_d, segs)) ** 2, starts) / segs
    raw = np.r_[flat[starts].sum(), mean_d.sum(), flat[lags].sum(1)]     # observed, null mean, draws
    if binary:
        n1 = f.sum()
        if n1 == 0 or n1 == n:
            return {"score": np.nan, "shifts": len(lags), "null_mean": np.nan, "null_std": np.nan,
                    "z": np.nan, "p": np.nan, "p_empirical": np.nan}
        scale = 1.0 / (n1 * (n - n1))
        s = (raw - n1 * (n1 + 1) / 2) * scale
        o = 1 - s if direction < 0 else s
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = 1.0 / np.sqrt((v ** 2).sum() * (g ** 2).sum())
        s = raw * scale
        o = direction * s
    sd = np.sqrt(max(var_d.sum(), 0.0)) * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (o[0] - o[1]) / sd
    finite = np.isfinite(o[0])
    p = float(stats.norm.sf(z)) if finite and np.isfinite(z) else np.nan
    p_emp = (1 + (o[2:] >= o[0]).sum()) / (1 + len(lags)) if finite else np.nan
    if finite and len(segs) >= BETWEEN:          # both nulls must be passed: each is a valid p alone
        pb, pb_emp = between_test((-1 if direction < 0 else 1) * (flat[starts] - mean_d), len(lags))
        p, p_emp = max(p, pb), max(p_emp, pb_emp)
    return {"score": s[0], "shifts": len(lags), "null_mean": o[1], "null_std": sd, "z": z, "p": p,
            "p_empirical": p_emp}


def between_test(terms: np.ndarray, draws: int) -> tuple[float, float]:
    """One-sided sign-flip test of ``terms [documents]`` (each document's oriented cross-product minus
    its own circular-shift mean): under the null of a unit that knows nothing of the feature the
    documents are independent and each term is as likely negative as positive, whatever the unit's
    and the feature's autocorrelation inside the document. The shift null alone misses that case: a
    unit drifting as slowly as a document is long (AR(1) 0.98 over 30-60 steps) against a ramp in
    each document (``column``) made a circularly shifted ramp a saw, whose spread understates the
    real one, and came out significant at 0.05 in 10-15% of tests. Returns the Gaussian tail of
    ``sum / sqrt(sum of squares)`` and the rank p-value over ``draws`` random sign patterns."""
    obs, spread = terms.sum(), np.sqrt((terms ** 2).sum())
    if not spread > 0:
        return np.nan, np.nan
    signs = np.random.default_rng(SEED + 1).integers(0, 2, (draws, len(terms)), dtype=np.int8) * 2 - 1
    flipped = signs @ terms
    return float(stats.norm.sf(obs / spread)), (1 + (flipped >= obs).sum()) / (1 + draws)
