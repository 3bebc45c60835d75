"""Pattern search (as in LSTMVis, Strobelt et al. 2018): the units that are on inside a selected span
of text and off around it. Pure functions over arrays; the dashboard only draws their results."""
from __future__ import annotations

import warnings

import numpy as np


def span_scores(states: np.ndarray, a: int, b: int, has_text: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """How much each unit is on inside ``a:b`` and off around it.

    Args:
        states: ``[time, units]`` the units over the stretch of text being searched (the page shown).
        a, b: the selected span, as row indices into ``states`` (``0 <= a < b <= time``).
        has_text: ``[time]`` bool, False at steps without text (BOS, EOS, padding), which are then
            left out of every mean and of the standard deviation; None: every step has text.

    Returns:
        ``{"inside", "around", "score"}``, each ``[units]``: the mean inside the span, the mean over
        equal stretches either side of it (clipped to ``states``; 0 when there is nothing around),
        and ``(inside - around) / std`` with ``std`` each unit's standard deviation over all of
        ``states`` (plus 1e-6, so a constant unit scores 0, not inf). NaN steps are left out of the
        means; a unit that is NaN throughout scores NaN, never 0.
    """
    x = np.array(states, np.float64)
    if x.ndim != 2 or not 0 <= a < b <= x.shape[0]:
        raise ValueError(f"span {a}:{b} is not inside states of shape {list(x.shape)}")
    if has_text is not None:
        x[~np.asarray(has_text, bool)] = np.nan       # no character read: not a step of the span's text
    n = b - a
    lo, hi = max(0, a - n), min(x.shape[0], b + n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # an all-NaN unit: NaN is the answer
        inside = np.nanmean(x[a:b], 0)
        rest = np.concatenate([x[lo:a], x[b:hi]])
        around = np.nanmean(rest, 0) if len(rest) else np.zeros(x.shape[1])
        sd = np.nanstd(x, 0) + 1e-6
    return {"inside": inside, "around": around, "score": (inside - around) / sd}


def rank_units(scores: dict[str, dict[str, np.ndarray]], top: int) -> list[tuple[str, int, float, float, float]]:
    """``scores``: ``key -> span_scores(...)``. Returns the ``top`` units by score, best first, as
    ``(key, index, inside, around, score)``; NaN scores rank last and are dropped."""
    rows = [(k, i, float(s["inside"][i]), float(s["around"][i]), float(s["score"][i]))
            for k, s in scores.items() for i in range(len(s["score"])) if np.isfinite(s["score"][i])]
    rows.sort(key=lambda r: -r[4])
    return rows[:top]

