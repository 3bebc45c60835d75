"""What a unit does, read off the text where it is most on and most off: its top-k and bottom-k
steps, each with the text around it and the unit's value at every character of that window.

Needs no feature, so it is the first thing to read about a unit nobody has a hypothesis for.
On a Run of words or subwords a window is a run of steps inside the step's own document (another
document's text was never read by that state), and steps without text (BOS, EOS, padding) are not
ranked. A Run
is streamed in chunks of rows; each unit keeps a running top-k, so memory stays ``[k + chunk, units]``
whatever the Run's length.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rnnscope.errors import RnnscopeError

from . import reductions
from .source import as_source


def _keep_largest(best_v: np.ndarray, best_s: np.ndarray, vals: np.ndarray, steps: np.ndarray, k: int):
    """Merge a chunk into the running top-k. ``best_* [k, units]`` in step order, ``vals [rows, units]``,
    ``steps [rows]`` all later than any kept one. Among equal values the earliest steps stay (so the
    answer does not depend on the chunk size); the result is again in step order."""
    cand_v = np.concatenate([best_v, vals])
    cand_s = np.concatenate([best_s, np.broadcast_to(steps[:, None], vals.shape)])
    thr = np.partition(cand_v, len(cand_v) - k, axis=0)[len(cand_v) - k]        # k-th largest per unit
    above = cand_v > thr
    tie = cand_v == thr
    keep = above | (tie & (np.cumsum(tie, 0) <= k - above.sum(0)))
    U = vals.shape[1]
    return cand_v.T[keep.T].reshape(U, k).T, cand_s.T[keep.T].reshape(U, k).T


def _extremes(a, k: int, chunk: int, has_text: np.ndarray) -> dict[str, np.ndarray]:
    """``a [steps, units]`` -> ``{"top": steps [k, units], "bottom": ...}``, strongest first. NaN and
    steps without text never rank above a number."""
    out = {}
    for side, (best_v, best_s) in _extreme_sets(a, k, chunk, has_text).items():
        order = np.lexsort((best_s, -best_v), axis=0)                 # value first, then earliest step
        out[side] = np.take_along_axis(best_s, order, 0)
    return out


def _extreme_sets(a, k: int, chunk: int, has_text: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{side: (values [k, units], steps [k, units])}`` in step order: the k largest of ``±a`` per unit
    (NaN and steps without text at -inf; equal values keep the earlier step), ``k <= steps``."""
    T = a.shape[0]

    def rows(s, e, sign):
        v = sign * np.asarray(a[s:e], np.float32)
        v[np.isnan(v)] = -np.inf
        v[~has_text[s:e]] = -np.inf
        return v

    out = {}
    for side, sign in (("top", 1.0), ("bottom", -1.0)):
        best_v = rows(0, k, sign)                   # seeded with the first k steps (k <= T): no placeholders
        best_s = np.broadcast_to(np.arange(k)[:, None], best_v.shape)
        for s in range(k, T, chunk):
            e = min(T, s + chunk)
            best_v, best_s = _keep_largest(best_v, best_s, rows(s, e, sign), np.arange(s, e), k)
        out[side] = best_v, best_s
    return out


def top_contexts(run, k: int = 10, window: int = 40, text: str | None = None, *, keys=None,
                 chunk: int = 16384, progress: bool = True, client=None) -> pd.DataFrame:
    """For every unit of every state key (or of ``keys``), the ``k`` steps where it is highest and the
    ``k`` where it is lowest, with the text around each.

    ``run``: a ``probe.Run``, a ``source.Source`` or an in-memory trace ``key -> [time, units]`` with its
    ``text``. The window holds ``window`` steps: the step itself and the ``window - window // 4`` - 1
    before it (what the unit has read), and ``window // 4`` after; shorter at its document's ends.

    Returns one row per (unit, side, rank): ``unit, key, index, side`` (``top`` / ``bottom``),
    ``rank`` (0 = most extreme), ``step, value, start`` (first step of the window), ``offset``
    (the step's position in it), ``context`` (the text the window's steps read), ``values`` (float32,
    the unit's value at each step of the window), ``char_start`` (where ``context`` starts in the
    text) and ``token_start, token_end`` (the step's own span in ``context``; -1 for a step without
    text). On a character Run steps are characters: ``token_start == offset``. Equal values rank by
    the earlier step. ``client``: a Dask client; a Run's keys are then ranked shard by shard on its
    workers (the same steps).
    """
    src = as_source(run, text)
    T = src.steps
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise RnnscopeError(f"k={k!r} asks for no contexts", "use k >= 1")
    if k > T:
        what = "characters" if src.char_level else "steps"
        raise RnnscopeError(f"k={k} is larger than the text ({T} {what})", f"use k <= {T}")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise RnnscopeError(f"window={window!r} holds no character", "use window >= 1")
    keys = list(keys) if keys is not None else src.state_keys
    for key in keys:
        src.array(key)                  # every key checked before any work
    before, after = window - window // 4, window // 4
    first, last = _text_edges(src)
    frames = []
    for key in tqdm(keys, desc="contexts", unit="key", disable=not progress):
        a = src.array(key)
        U = a.shape[1]
        sides = []
        found = None if client is None else reductions.extremes(client, a, k, chunk, src.scored)
        for side, steps in (found or _extremes(a, k, chunk, src.scored)).items():     # frames: every step
            steps = steps.T.ravel()                                    # unit-major: [units * k]
            unit = np.repeat(np.arange(U), k)
            doc = src.step_bounds[src.step_document[steps]]
            start = np.maximum(steps - before + 1, doc[:, 0])
            end = np.minimum(steps + after + 1, doc[:, 1])
            c0, c1 = first[start], np.maximum(last[end - 1], first[start])
            own = src.spans[steps]
            rows = np.minimum(start[:, None] + np.arange(window), T - 1)
            order = np.argsort(rows, axis=None, kind="stable")        # read the memory map in step order
            flat = np.empty(rows.size, np.float32)
            flat[order] = np.asarray(a[rows.ravel()[order], unit.repeat(window)[order]], np.float32)
            vals = flat.reshape(rows.shape)
            sides.append(pd.DataFrame({
                "unit": [f"{key}:{u}" for u in unit], "key": key, "index": unit, "side": side,
                "rank": np.tile(np.arange(k), U), "step": steps, "value": vals[np.arange(len(steps)), steps - start],
                "start": start, "offset": steps - start,
                "context": [src.text[s:e] for s, e in zip(c0, c1)],
                "values": [v[:e - s] for v, s, e in zip(vals, start, end)], "char_start": c0,
                "token_start": np.where(own[:, 0] >= 0, own[:, 0] - c0, -1),
                "token_end": np.where(own[:, 0] >= 0, own[:, 1] - c0, -1)}))
        frames.append(pd.concat(sides).sort_values("index", kind="stable"))      # unit by unit, top first
    return pd.concat(frames, ignore_index=True)


def _text_edges(src) -> tuple[np.ndarray, np.ndarray]:
    """``[steps]`` each: the first character of the first step with text at or after it, and the end
    of the last step with text at or before it (so a window's text is ``text[first[start]:last[end - 1]]``)."""
    n = src.steps
    idx = np.arange(n)
    has = src.has_text
    after = np.minimum.accumulate(np.where(has, idx, n)[::-1])[::-1]     # next step with text
    before = np.maximum.accumulate(np.where(has, idx, -1))               # previous step with text
    starts = np.r_[src.spans[:, 0], len(src.text)]
    ends = np.r_[src.spans[:, 1], 0]
    return starts[after], ends[before]          # index -1 (none before) reads the 0 appended last
