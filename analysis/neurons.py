"""Neuron search: which units track which feature, how strongly on text they were not selected on,
and how surely, against a null that keeps the autocorrelation of both series.

Every unit of every state key is scored against every feature: ROC-AUC for binary features,
Pearson (and Spearman) r for continuous ones. The text is split in two: the first part
(``1 - heldout``) is where a unit would be *selected*, the later part where its score is *checked*.
Significance is computed on the held-out part from ``shifts`` circular shifts of the feature
within that part: shifting keeps each series' autocorrelation (a unit that drifts slowly and a
feature that comes in long runs correlate by chance far more often than i.i.d. shuffles admit).
The p-value treats the shifted scores as a Gaussian sample of the null: a Student-t prediction
interval with ``shifts - 1`` degrees of freedom (the sd itself is estimated from few draws, so a
Gaussian tail would be anti-conservative); the empirical rank p-value, bounded below by
``1 / (shifts + 1)``, is reported beside it; Benjamini-Hochberg q-values run across all units and features.

Everything streams in chunks of rows with sufficient statistics, so a Run is never loaded whole:
pass 1 accumulates sums, products with the (shifted) feature columns, and a per-unit histogram of
the values; pass 2 turns each value into its mid-rank from the histogram and multiplies ranks with
the label columns, which gives AUC (Mann-Whitney) and Spearman r. Ranks are taken at 2^-7
relative resolution (values binned on their float16 bit pattern, 8192 bins): values closer than
that tie, and ties are counted half, as in the usual AUC.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from rnnscope.probe import parse_key
from rnnscope.errors import RnnscopeError

from . import features as feats
from . import kernels
from .kernels import BINS
from .source import Source, as_source



def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """q-values for ``p`` (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m:
        order = np.argsort(p[ok])
        ranked = p[ok][order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(ranked, 1.0)
        q[ok] = out
    return q


def _shifted(col: np.ndarray, shifts: int) -> np.ndarray:
    """``[n] -> [n, 1 + shifts]``: the column, then circular shifts spread evenly over its length
    (each at least ``n / (shifts + 1)`` steps, far past any local autocorrelation)."""
    n = len(col)
    offs = [0] + [int(round(n * (k + 1) / (shifts + 1))) for k in range(shifts)]
    return np.stack([np.roll(col, o) for o in offs], 1)


class _Part:
    """Label columns for one part of the text, and which columns belong to which feature."""

    def __init__(self, F: pd.DataFrame, binary: list[str], shifts: int):
        self.n = len(F)
        xcols, rcols = [], []
        self.slots = {}
        for name in F.columns:
            f = F[name].to_numpy(np.float64)
            if name in binary:
                rcols.append(_shifted(f, shifts))
                self.slots[name] = ("r", sum(c.shape[1] for c in rcols) - shifts - 1)
            else:
                fz = f - f.mean()
                norm = np.sqrt((fz ** 2).sum())
                fz = fz / norm if norm > 0 else fz * np.nan
                rk = stats.rankdata(f)
                rk -= rk.mean()
                rnorm = np.sqrt((rk ** 2).sum())
                rk = rk / rnorm if rnorm > 0 else rk * np.nan
                xcols.append(_shifted(fz, shifts))
                self.slots[name] = ("x", sum(c.shape[1] for c in xcols) - shifts - 1)
                rcols.append(rk[:, None])
                self.slots[name + "\0rank"] = ("r", sum(c.shape[1] for c in rcols) - 1)
        self.X = np.nan_to_num(np.concatenate(xcols, 1) if xcols else np.zeros((self.n, 0))).astype(np.float32)
        self.R = (np.concatenate(rcols, 1) if rcols else np.zeros((self.n, 0))).astype(np.float32)


def _score_key(a, parts, chunk) -> list[dict]:
    """Both passes over one key ``a [time, units]``; per part: Pearson numerators, sums, and rank
    products, all per unit."""
    U = a.shape[1]
    decode = a.dtype == np.float16
    out = []
    for (s0, e0), part in parts:
        n = e0 - s0
        counts = np.zeros((U, BINS), np.int64)
        for s in range(s0, e0, chunk):
            kernels.histogram(kernels.float16_bits(np.asarray(a[s:min(e0, s + chunk)])), kernels.BIN_OF, counts)
        cum = counts.cumsum(1)
        mid = cum - (counts - 1) / 2 - (n + 1) / 2                    # centred mid-ranks per bin
        rank_ss = (counts * mid ** 2).sum(1)
        mid = mid.astype(np.float32)
        ref = np.nan_to_num(np.asarray(a[s0:min(e0, s0 + 1024)], np.float64).mean(0))
        s1, s2, bad = np.zeros(U), np.zeros(U), np.zeros(U, bool)
        xc = np.zeros((U, part.X.shape[1]))
        rc = np.zeros((U, part.R.shape[1]))
        for s in range(s0, e0, chunk):
            e = min(e0, s + chunk)
            raw = np.asarray(a[s:e])
            x = np.empty((e - s, U), np.float32) if decode else np.ascontiguousarray(raw, np.float32)
            r = np.empty((e - s, U), np.float32)
            kernels.ranks_and_sums(kernels.float16_bits(raw), x, decode, kernels.BIN_OF, kernels.VALUE_OF,
                                   mid, ref, r, s1, s2, bad)
            if part.X.shape[1]:      # the columns sum to zero, so x need not be centred
                xc += x.T @ part.X[s - s0:e - s0]
            rc += r.T @ part.R[s - s0:e - s0]
        mean = ref + s1 / n
        sxx = s2 - s1 * s1 / n
        out.append({"n": n, "sd": np.sqrt(np.maximum(sxx, 0)), "mean": mean, "xc": xc, "rc": rc,
                    "rank_sd": np.sqrt(rank_ss), "bad": bad})
    return out


def _scores(acc: dict, part: _Part, F: pd.DataFrame, name: str, binary: bool) -> np.ndarray:
    """``[units, columns]`` scores of one feature (column 0 observed, the rest shifted)."""
    kind, j = part.slots[name]
    if binary:
        f = F[name].to_numpy()
        n1 = int(f.sum())
        n0 = part.n - n1
        cols = acc["rc"][:, j:j + _width(part, name)]
        rank_sum = cols + n1 * (part.n + 1) / 2            # undo the centring of the ranks
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0) if n1 and n0 else np.full_like(cols, np.nan)
    cols = acc["xc"][:, j:j + _width(part, name)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return cols / acc["sd"][:, None]


def _width(part: _Part, name: str) -> int:
    kind, j = part.slots[name]
    later = [jj for (kk, jj) in part.slots.values() if kk == kind and jj > j]
    total = part.X.shape[1] if kind == "x" else part.R.shape[1]
    return (min(later) if later else total) - j


def find_neurons(run, features=None, *, text: str | None = None, language="auto", keys=None,
                 heldout: float = 0.3, shifts: int = 16, chunk: int = 16384, progress: bool = True) -> pd.DataFrame:
    """Score every unit of every state key against every feature.

    ``run``: a ``probe.Run`` or an in-memory trace (with ``text``). ``features``: built-in names or a
    dict name -> ``text -> array[time]``; default: the built-ins that suit the text's language.
    Returns one row per (unit, feature), sorted by held-out strength, with columns ``unit, key,
    layer, kind, index, feature, metric, direction, score, heldout_score, spearman, heldout_spearman,
    null_mean, null_std, z, p_value, p_empirical, q_value, strength``.

    A unit's ``direction`` is chosen on the selection part: for AUC, -1 means the unit is *lower*
    inside the feature, and ``score`` / ``heldout_score`` are the AUC of the unit so oriented (so
    always >= 0.5 on the selection part, and below 0.5 held out only if the unit flips). ``strength``
    is the held-out effect in that direction: ``2 * (AUC - 0.5)`` or ``direction * r``, in [-1, 1].
    """
    src = as_source(run, text, language)
    F, binary = feature_table(src, features)
    keys = list(keys) if keys is not None else src.state_keys
    if not keys:
        raise RnnscopeError("nothing to score: the source has no state keys", "record states, not only gradients")
    T = len(src.text)
    split = int(round(T * (1 - heldout)))
    if not 0.0 < heldout < 1.0 or split < 10 or T - split < 10:
        raise RnnscopeError(f"cannot split {T} characters with heldout={heldout}",
                            "use 0 < heldout < 1 and a text of at least a few hundred characters")
    bounds = [(0, split), (split, T)]
    parts = [(b, _Part(F.iloc[b[0]:b[1]].reset_index(drop=True), binary, shifts if i else 0))
             for i, b in enumerate(bounds)]
    frames = []
    for key in tqdm(keys, desc="neurons", unit="key", disable=not progress):
        a = src.arrays[key]
        if a.shape[0] != T:
            raise RnnscopeError(f"{key} has {a.shape[0]} steps but the text has {T} characters",
                                "analyse the text the Run was recorded on")
        accs = _score_key(a, parts, chunk)
        bad = accs[0]["bad"] | accs[1]["bad"]
        info = parse_key(key)
        for name in F.columns:
            is_bin = name in binary
            disc = _scores(accs[0], parts[0][1], F.iloc[:split], name, is_bin)[:, 0]
            held = _scores(accs[1], parts[1][1], F.iloc[split:], name, is_bin)
            obs, null = held[:, 0], held[:, 1:]
            if is_bin:
                sp = hsp = np.full(len(obs), np.nan)
            else:
                sp = _spearman(accs[0], parts[0][1], name)
                hsp = _spearman(accs[1], parts[1][1], name)
            mu, sd = null.mean(1), null.std(1, ddof=1) if null.shape[1] > 1 else np.full(len(obs), np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                z = (obs - mu) / sd
                p_emp = (1 + (np.abs(null - mu[:, None]) >= np.abs(obs - mu)[:, None]).sum(1)) / (1 + null.shape[1])
            # sd comes from only ``shifts`` draws: a Student-t prediction interval, not a Gaussian tail
            k = null.shape[1]
            p = 2 * stats.t.sf(np.abs(z) / np.sqrt(1 + 1 / k), max(k - 1, 1))
            for arr in (disc, obs, sp, hsp, z, p, p_emp):
                arr[bad] = np.nan
            if is_bin:   # orient each unit on the selection part: AUC 0.02 is a unit that is off inside
                direction = np.where(disc < 0.5, -1, 1)
                flip = direction < 0
                disc, obs, mu = np.where(flip, 1 - disc, disc), np.where(flip, 1 - obs, obs), np.where(flip, 1 - mu, mu)
                z = z * direction
            else:
                direction = np.where(disc < 0, -1, 1)
            frames.append(pd.DataFrame({
                "unit": [f"{key}:{i}" for i in range(len(obs))], "key": key, "layer": info["layer"],
                "kind": info["kind"], "index": np.arange(len(obs)), "feature": name,
                "metric": "auc" if is_bin else "pearson", "direction": direction, "score": disc, "heldout_score": obs,
                "spearman": sp, "heldout_spearman": hsp, "null_mean": mu, "null_std": sd, "z": z,
                "p_value": p, "p_empirical": p_emp}))
    table = pd.concat(frames, ignore_index=True)
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy())
    table["strength"] = np.where(table["metric"] == "auc", 2 * (table["heldout_score"] - 0.5),
                                 table["heldout_score"] * table["direction"])
    return table.sort_values("strength", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _spearman(acc: dict, part: _Part, name: str) -> np.ndarray:
    _, j = part.slots[name + "\0rank"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return acc["rc"][:, j] / acc["rank_sd"]


def feature_table(src: Source, features) -> tuple[pd.DataFrame, list[str]]:
    """``[time x features]`` and the names of the binary ones. Constant features are dropped with a
    warning (no unit can be scored against them)."""
    if features is None:
        features = default_features(src.language)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = feats.compute(src.text, features, src.language or "c")
    keep = []
    for name in F.columns:
        col = F[name].to_numpy(np.float64)
        if not np.isfinite(col).all():
            raise RnnscopeError(f"feature {name!r} has NaN or Inf values", "features must be finite numbers")
        if col.min() == col.max():
            warnings.warn(f"feature {name!r} is constant on this text ({col[0]:g}); skipped", stacklevel=3)
        else:
            keep.append(name)
    if not keep:
        raise RnnscopeError("every feature is constant on this text", "use a longer or more varied text")
    F = F[keep].astype(np.float64)
    binary = [c for c in keep if set(np.unique(F[c])) <= {0.0, 1.0}]
    return F, binary


def default_features(language: str | None) -> list[str]:
    prose = ["in_double_quotes", "in_single_quotes", "column", "to_line_end", "indent"]
    if language is None:
        return prose
    return ["in_string", "in_comment", "column", "to_line_end", "indent", "paren_depth", "bracket_depth",
            "brace_depth", "in_if_condition", "in_double_quotes"]


def top_units(table: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """The ``k`` strongest units per feature (by held-out strength)."""
    top = table.dropna(subset=["strength"]).sort_values("strength", ascending=False, kind="stable")
    top = top.groupby("feature", sort=False).head(k)
    order = {f: i for i, f in enumerate(top["feature"].unique())}
    return top.sort_values("feature", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
