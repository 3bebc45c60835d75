"""Control tasks (Hewitt and Liang 2019): how much of a feature the characters alone give away.

A unit that separates "inside a string" may only be detecting the quote character. For every
feature the control is the best score *any* function of the current and previous character reaches
on it: that function is the feature's mean per (previous, current) character pair, which is the
optimal ranking for AUC (Neyman-Pearson) and the optimal predictor for Pearson r. It is fitted on
the selection part and scored on the held-out part, like a unit, so a lookup table that only
memorises rare pairs gains nothing. A unit's ``selectivity`` is its held-out score minus this control
score: a comment cell stays well above zero, a quote detector does not.

On a Run of words or subwords the pair is (previous token, current token) over the scored steps,
the previous one reset at each document's start: what the tokens alone give away.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

# Pseudo-count pulling a rare pair's mean towards the feature's overall mean (a pair seen once
# says little); one pseudo-observation changes frequent pairs by < 1%.
PRIOR = 1.0


def pair_ids(text: str) -> np.ndarray:
    """``[time]`` one id per (previous, current) character pair (the first character's previous is none)."""
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    prev = np.r_[-1, chars[:-1]]
    _, ids = np.unique(prev * (1 << 22) + chars, return_inverse=True)   # code points < 2^21
    return ids.ravel()


def token_pair_ids(tokens: list[str], document: np.ndarray) -> np.ndarray:
    """``[steps]`` one id per (previous, current) token pair; a document's first step has no previous."""
    _, tok = np.unique(np.asarray(tokens, dtype=object).astype(str), return_inverse=True)
    tok = tok.ravel().astype(np.int64)
    prev = np.r_[-1, tok[:-1]]
    prev[np.r_[True, document[1:] != document[:-1]]] = -1
    _, ids = np.unique((prev + 1) * (len(tok) + 1) + tok, return_inverse=True)
    return ids.ravel()


def pair_lookup(ids: np.ndarray, f: np.ndarray, split: int) -> np.ndarray:
    """``[time]`` the feature's mean given the character pair, fitted on ``[:split]`` only; pairs
    never seen there get the overall mean."""
    fit, y = ids[:split], f[:split].astype(np.float64)
    m = int(ids.max()) + 1
    counts = np.bincount(fit, minlength=m)
    sums = np.bincount(fit, weights=y, minlength=m)
    table = (sums + PRIOR * y.mean()) / (counts + PRIOR)
    return table[ids]


def score(pred: np.ndarray, f: np.ndarray, binary: bool) -> float:
    """AUC (ties half) or Pearson r of a predictor against the feature."""
    if binary:
        n1 = f.sum()
        n0 = len(f) - n1
        if not n1 or not n0:
            return np.nan
        r = stats.rankdata(pred)
        return float((r[f == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    if pred.std() == 0 or f.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, f)[0, 1])


def character_controls(text: str, F: pd.DataFrame, binary: list[str], split: int,
                       ids: np.ndarray | None = None) -> pd.DataFrame:
    """One row per feature of ``F [time x features]``: ``control_selection_score`` (in-sample, an
    upper bound of what the characters give away) and ``control_score`` (held out, what selectivity
    is measured against). ``ids``: the pair of each row of ``F`` (``token_pair_ids``) when its rows
    are not the characters of ``text``."""
    ids = pair_ids(text) if ids is None else ids
    rows = []
    for name in F.columns:
        f = F[name].to_numpy(np.float64)
        pred = pair_lookup(ids, f, split)
        is_bin = name in binary
        rows.append({"feature": name, "control_selection_score": score(pred[:split], f[:split], is_bin),
                     "control_score": score(pred[split:], f[split:], is_bin)})
    return pd.DataFrame(rows)
