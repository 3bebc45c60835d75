"""Sparse probe: how few units carry a feature (as Radford et al.'s sentiment neuron was found).

An L1-regularised logistic regression (binary feature) or linear regression (continuous) from the
units to the feature, fitted on the first part of the scored steps (whole documents where there are several) along a path of penalties, from the one
that zeroes every weight down to ``lam_max * min_ratio``. Each point of the path is scored on the
held-out later part (AUC or Pearson r of the prediction). Units enter the path in order of joint
usefulness: a unit that only repeats another one enters late or never, unlike in per-unit scores.
Solved by FISTA (proximal gradient with momentum) on standardised units, warm-started along the path.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rnnscope.errors import RnnscopeError

from .neurons import feature_table
from .parts import split_steps
from .source import as_source


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    n1 = int(y.sum())
    n0 = len(y) - n1
    if not n1 or not n0:
        return np.nan
    r = stats.rankdata(score)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _fista(X, y, lam, w, b, logistic, L, iters=300, tol=1e-4):
    """min_w  loss(Xw + b, y) / n + lam * |w|_1  (b unpenalised)."""
    n = len(y)
    z, zb, t = w.copy(), b, 1.0
    for _ in range(iters):
        pred = X @ z.astype(np.float32) + zb
        resid = ((1 / (1 + np.exp(-pred)) - y) if logistic else (pred - y)).astype(np.float32)
        gw, gb = X.T @ resid / n, resid.mean()
        w_new = z - gw / L
        w_new = np.sign(w_new) * np.maximum(np.abs(w_new) - lam / L, 0)
        b_new = zb - gb / L
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = w_new + (t - 1) / t_new * (w_new - w)
        zb = b_new + (t - 1) / t_new * (b_new - b)
        done = np.abs(w_new - w).max(initial=0) < tol * max(1.0, np.abs(w_new).max(initial=0)) and abs(b_new - b) < tol
        w, b, t = w_new, b_new, t_new
        if done:
            break
    return w, b


def sparse_probe(run, feature: str, *, text: str | None = None, language="auto", units=None, keys=None,
                 heldout: float = 0.3, max_rows: int = 20000, candidates: int = 256, steps: int = 20,
                 min_ratio: float = 0.01, seed: int = 0, client=None) -> pd.DataFrame:
    """Fit the path for one ``feature`` (a built-in name or ``{name: fn}``). ``units``: ``key:index``
    candidates (e.g. the top of ``find_neurons``), else every unit of ``keys`` (default: h and c);
    the ``candidates`` units most correlated with the feature on the fitting rows enter the path
    (screening, as in the strong rules for the lasso; it keeps the fit to seconds).
    Returns one row per path point: ``lam, n_units, heldout_score, metric, units`` (the selected units,
    largest weight first). ``frame.attrs['units_needed']``: the fewest units reaching 95% of the path's
    best held-out strength. With a Dask ``client`` the inputs are computed on its workers (a sharded
    Run's feature track shard by shard, and the fitting and held-out rows of the units each shard
    holds): the same numbers, so the same path; the fit itself is seconds, here.
    """
    src = as_source(run, text, language)
    wanted = [feature] if isinstance(feature, str) else feature
    if client is not None:
        from .reductions import worker_features
        wanted = worker_features(client, src, wanted)
    F, binary = feature_table(src, wanted)
    name = F.columns[0]
    y_all = F[name].to_numpy(np.float64)
    logistic = name in binary
    if units is None:
        keys = keys or [k for k in src.state_keys if k.rsplit(".", 1)[1] in ("h", "c")] or src.state_keys
        units = [f"{k}:{i}" for k in keys for i in range(src.arrays[k].shape[1])]
    if not units:
        raise RnnscopeError("no units to probe", "pass units= or keys=")
    sp = split_steps(src, heldout)             # scored steps only; whole documents to each part
    K, split = len(sp.rows), sp.at
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(split, min(split, max_rows), replace=False))
    test = np.sort(split + rng.choice(K - split, min(K - split, max_rows), replace=False))
    by_key: dict[str, list[int]] = {}
    for u in units:
        k, i = u.rsplit(":", 1)
        if k not in src.arrays:
            raise RnnscopeError(f"unknown unit {u}", "use key:index with a key the run holds")
        by_key.setdefault(k, []).append(int(i))

    def gather(rows):
        """``[rows, units]`` float64, C order whichever path read it: a column's mean and spread then add
        up in the same order (NumPy's follows the layout)."""
        steps = sp.rows[rows]
        if client is not None:
            from .distributed import gather_rows
            got = gather_rows(client, src.arrays, by_key, steps)
            if got is not None:
                return got
        return np.ascontiguousarray(np.concatenate([np.asarray(src.arrays[k][steps][:, idx], np.float64)
                                                    for k, idx in by_key.items()], 1))

    Xtr, Xte = gather(train), gather(test)
    ytr, yte = y_all[train], y_all[test]
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    units = [u for k, idx in by_key.items() for u in (f"{k}:{i}" for i in idx)]
    if len(units) > candidates:
        screen = np.abs(Xtr.T @ (ytr - ytr.mean()))
        keep = np.sort(np.argsort(-screen)[:candidates])
        Xtr, Xte, units = Xtr[:, keep], Xte[:, keep], [units[j] for j in keep]
    Xtr, Xte = Xtr.astype(np.float32), Xte.astype(np.float32)
    if not logistic:
        ym, ys = ytr.mean(), ytr.std() or 1.0
        ytr = (ytr - ym) / ys
    v = rng.standard_normal(Xtr.shape[1])
    for _ in range(30):                       # power iteration: the largest eigenvalue of X'X / n
        v = Xtr.T @ (Xtr @ v) / len(ytr)
        v /= np.linalg.norm(v)
    L = float(v @ (Xtr.T @ (Xtr @ v)) / len(ytr)) * (0.25 if logistic else 1.0) * 1.01
    b0 = float(np.log(ytr.mean() / (1 - ytr.mean()))) if logistic else 0.0
    resid0 = ((1 / (1 + np.exp(-b0))) - ytr) if logistic else ytr - ytr.mean()
    lam_max = float(np.abs(Xtr.T @ resid0).max() / len(ytr))
    w, b, rows = np.zeros(Xtr.shape[1]), b0, []
    for lam in lam_max * np.geomspace(1, min_ratio, steps):
        w, b = _fista(Xtr, ytr, lam, w, b, logistic, L)
        pred = Xte @ w + b
        nz = np.nonzero(w)[0]
        if not len(nz):
            score = 0.5 if logistic else 0.0
        elif logistic:
            score = _auc(pred, yte)
        else:
            score = float(np.corrcoef(pred, yte)[0, 1]) if pred.std() > 0 else 0.0
        order = nz[np.argsort(-np.abs(w[nz]))]
        rows.append({"feature": name, "lam": lam, "n_units": len(nz), "metric": "auc" if logistic else "pearson",
                     "heldout_score": score, "units": ",".join(units[j] for j in order)})
    path = pd.DataFrame(rows)
    strength = 2 * (path["heldout_score"] - 0.5).abs() if logistic else path["heldout_score"].abs()
    good = path[strength >= 0.95 * strength.max()]
    path.attrs["units_needed"] = int(good["n_units"].min()) if len(good) else None
    return path
