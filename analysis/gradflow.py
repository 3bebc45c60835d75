"""Gradient flow through time (Pascanu, Mikolov & Bengio 2013).

``gradient_norms(run)``: from a Run recorded with ``--grad``, the norm over units of ``grad_h`` and
``grad_c`` at every step, per layer: where the total loss pulls hardest, and where it explodes.

``gradient_decay(model, ids)``: how far back one prediction's gradient reaches. For many sampled
positions t (one loss each, batched: windows are independent batch elements, so summing their losses
keeps each gradient its own), the norm of dL_t/dh_{t-k} and dL_t/dc_{t-k} for lags k = 0..max_lag,
averaged over positions; ``half_lives`` fits log-norm against lag and reports the half-life in steps.
A plain RNN's Jacobian product shrinks geometrically; the LSTM's cell path multiplies by forget gates
only, which can stay near 1. With several documents (the state reset at each), a window never
crosses a boundary: the lag-k gradient is measured only where step t - k is in t's own document.

``decay_through(subject, documents)``: the same curve for any model (a ``Subject``: a classifier, a
tagger, a word model), through its own ``call`` and loss, one whole document per call: each norm
relative to its lag-0 norm, from sampled steps of a per-step loss, or from each document's last
step for a scalar loss per document.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rnnscope.probe import Probe, parse_key
from rnnscope.probe.subject import subject_of
from rnnscope.errors import RnnscopeError

from . import reductions
from .source import as_source


def gradient_norms(run, *, text: str | None = None, chunk: int = 65536, explode: float = 100.0,
                   client=None) -> pd.DataFrame:
    """``[time]`` rows, one column per gradient key: the L2 norm over units at each step (NaN where a
    gradient is NaN or infinite: it stays visible, never 0). Steps whose norm exceeds ``explode`` times
    that key's median (over finite steps) are counted in ``frame.attrs['exploding']``, non-finite ones
    in ``frame.attrs['nonfinite']``. ``client``: a Dask client; a Run's shards' norms are then computed
    on its workers (the same numbers)."""
    src = as_source(run, text)
    keys = src.need({"grad_h", "grad_c"}, "gradient norms", "record with `rnnscope probe ... --grad`")
    cols = {}
    for key in keys:
        a = src.arrays[key]
        found = None if client is None else reductions.grad_norms(client, a, chunk)
        cols[key] = _norms(a, chunk) if found is None else found
    frame = pd.DataFrame(cols)
    frame.index.name = "step"
    med = frame.median()
    frame.attrs["exploding"] = {k: int((frame[k] > explode * med[k]).sum()) for k in keys}
    frame.attrs["nonfinite"] = {k: int((~np.isfinite(frame[k].to_numpy())).sum()) for k in keys}
    return frame


def _norms(a, chunk: int) -> np.ndarray:
    """``a [steps, units]`` -> ``[steps]`` float64 L2 norms over units, NaN where not finite."""
    out = np.empty(a.shape[0], np.float64)
    for s in range(0, a.shape[0], chunk):
        x = np.asarray(a[s:s + chunk], np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            n = np.sqrt((x * x).sum(1))
        out[s:s + len(x)] = np.where(np.isfinite(n), n, np.nan)
    return out


def decay_ends(bounds: np.ndarray, window: int) -> np.ndarray:
    """The steps t at which a window ``t - window + 1 .. t`` and its target ``t + 1`` lie inside one
    document of ``bounds [documents, 2]`` (first step, step after the last)."""
    return np.concatenate([np.arange(a + window - 1, b - 1) for a, b in np.asarray(bounds, np.int64)]
                          + [np.zeros(0, np.int64)])


def gradient_decay(model: nn.Module, ids: torch.Tensor, *, positions: int = 512, max_lag: int = 200,
                   warmup: int = 50, batch: int = 64, seed: int = 0, progress: bool = True,
                   documents=None) -> pd.DataFrame:
    """``ids [1, time]`` (a next-token model's input, logits ``[batch, time, vocab]`` out);
    ``documents [documents, 2]``: each document's first step and the step after its last (default:
    one document), windows never crossing a boundary. Returns one row
    per (key, lag): ``key, layer, kind, lag, mean, geo_mean, q10, q90, positions, nonfinite``:
    statistics over the sampled positions of ``||dL_t / dstate_{t-lag}||``. A position whose norm is
    NaN or infinite makes that lag's statistics NaN and is counted in ``nonfinite``: a model that
    produces NaN gets NaN, never a number that looks like a measurement."""
    T = ids.shape[1]
    W = warmup + max_lag + 1
    bounds = np.array([[0, T]]) if documents is None else np.asarray(documents, np.int64)
    longest = int((bounds[:, 1] - bounds[:, 0]).max())
    if longest < W + 1:
        what = f"the text has {T} characters" if documents is None else f"the longest document has {longest} steps"
        raise RnnscopeError(f"{what}; a decay curve to lag {max_lag} after {warmup} "
                            f"warm-up steps needs at least {W + 1}", "use a longer text or a smaller --max-lag")
    rng = np.random.default_rng(seed)
    candidates = decay_ends(bounds, W)
    ends = np.sort(rng.choice(candidates, size=min(positions, len(candidates)), replace=False))
    norms: dict[str, list[np.ndarray]] = {}
    was = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(ends), batch), desc="decay", unit="batch", disable=not progress):
            e = ends[s:s + batch]
            windows = torch.stack([ids[0, t - W + 1:t + 1] for t in e])
            targets = ids[0, torch.as_tensor(e + 1)]
            with Probe(model, grad=True, kinds=["h"], param_grads=False) as p:
                logits = model(windows)
                nn.functional.cross_entropy(logits[:, -1], targets, reduction="sum").backward()
            for key in p.trace:
                if parse_key(key)["kind"].startswith("grad_"):
                    g = p.trace[key].detach().double()            # [B, W, units]
                    n = g.norm(dim=-1).flip(1)[:, :max_lag + 1]   # lag 0 first
                    norms.setdefault(key, []).append(n.numpy())
    finally:
        model.train(was)
    rows = []
    for key, parts in norms.items():
        n = np.concatenate(parts)                                  # [positions, lags]
        with np.errstate(divide="ignore"):
            logs = np.log(n)
        info = parse_key(key)
        for lag in range(n.shape[1]):
            col, lc = n[:, lag], logs[:, lag]
            rows.append({"key": key, "layer": info["layer"], "kind": info["kind"], "lag": lag,
                         **_lag_stats(col, lc), "positions": len(col),
                         "nonfinite": int((~np.isfinite(col)).sum())})
    return pd.DataFrame(rows)


def _lag_stats(col: np.ndarray, logs: np.ndarray) -> dict:
    """Mean, geometric mean and 10/90% quantiles of one lag's norms over positions; all NaN when any
    norm is NaN or infinite. The geometric mean is over the positive norms (0 when none is)."""
    if not np.isfinite(col).all():
        return dict.fromkeys(("mean", "geo_mean", "q10", "q90"), np.nan)
    return {"mean": col.mean(), "geo_mean": float(np.exp(logs[np.isfinite(logs)].mean())) if np.isfinite(logs).any() else 0.0,
            "q10": np.quantile(col, 0.1), "q90": np.quantile(col, 0.9)}


def half_lives(curve: pd.DataFrame, *, start: int = 1, stat: str = "geo_mean") -> pd.DataFrame:
    """Per key: the slope of ``log(stat)`` against lag (least squares over lags >= ``start``), the
    half-life ``ln 2 / -slope`` in steps (inf when the norm does not fall), the first lag at which the
    norm is below 1% of its value at ``start``, and ``exploding`` when it grows instead. A curve holding
    NaN or infinite norms is not fitted: ``nonfinite`` is True, its half-life and slope are NaN, and
    ``exploding`` is True when a norm overflowed to infinity."""
    rows = []
    for key, g in curve.groupby("key", sort=False):
        g = g[g["lag"] >= start]
        y = g[stat].to_numpy()
        nonfinite = bool((~np.isfinite(y)).any())
        ok = np.isfinite(y) & (y > 0)
        if nonfinite or ok.sum() < 2:
            slope, r2 = np.nan, np.nan
        else:
            lag, ly = g["lag"].to_numpy()[ok], np.log(y[ok])
            slope, icept = np.polyfit(lag, ly, 1)
            resid = ly - (slope * lag + icept)
            r2 = 1 - resid.var() / ly.var() if ly.var() > 0 else np.nan
        below = np.nonzero(y < 0.01 * y[0])[0] if len(y) else []
        rows.append({"key": key, "layer": int(g["layer"].iloc[0]), "kind": g["kind"].iloc[0],
                     "slope_per_step": slope, "half_life": np.nan if np.isnan(slope) else
                     (np.log(2) / -slope) if slope < 0 else np.inf,
                     "fit_r2": r2, "lag_to_1pct": int(g["lag"].iloc[below[0]]) if len(below) else None,
                     "max_lag": int(g["lag"].max()), "nonfinite": nonfinite,
                     "exploding": bool(np.isposinf(y).any() or slope > 0 or (y > 1e3 * y[0]).any())})
    return pd.DataFrame(rows)


def decay_ratios(subject, documents, *, positions: int = 512, max_lag: int = 200, loss=None, seed: int = 0,
                 progress: bool = False) -> pd.DataFrame:
    """How far back the loss of any model reaches, through its own ``call`` (one whole document per
    call, as ``record`` runs it; ``documents`` as ``ablate_documents`` takes them).

    For a per-step loss ``[T]`` (the Subject's, or ``loss=fn(output, ids[, document=])``): at up to
    ``positions`` steps t sampled over every document, ``||dL_t/dh_{t-k}|| / ||dL_t/dh_t||`` for lags
    k = 0..``max_lag`` that stay in t's document. For a scalar loss per document (a classifier's): in
    up to ``positions`` documents, ``||dL/dh_{T-1-k}|| / ||dL/dh_{T-1}||`` from its last step back. A
    reverse direction reads its document backwards, so its lags run forwards (its "last" step is 0).
    Returns one row per (key, document, step, lag): ``key, document, step, lag, ratio``;
    ``attrs["per"]``: "step" or "document"; ``attrs["zero_at_lag0"]``: positions left out because their
    gradient at lag 0 was exactly 0 (a key the loss at t does not read)."""
    from .calls import Doc, encoded, forward, measure, metric_of
    subject = subject_of(subject)
    docs = documents if isinstance(documents, list) and documents and all(isinstance(d, Doc) for d in documents) \
        else encoded(subject, documents)
    fn, model = metric_of(subject, loss), subject.model
    rng = np.random.default_rng(seed)
    total = sum(d.ids.shape[1] for d in docs)
    steps = set(rng.choice(total, size=min(positions, total), replace=False).tolist())
    chosen_docs = set(rng.choice(len(docs), size=min(positions, len(docs)), replace=False).tolist())
    per, rows, zero = None, [], 0
    was = model.training
    model.eval()
    try:
        for i, d in enumerate(tqdm(docs, desc="decay", unit="document", disable=not progress)):
            here = sorted(s - d.start for s in steps if d.start <= s < d.start + d.ids.shape[1])
            if (per == "step" and not here) or (per == "document" and i not in chosen_docs):
                continue
            with torch.enable_grad(), Probe(model, grad=True, param_grads=False) as p:
                value = _one_loss(measure(fn, forward(subject, d), d, keep_graph=True))
                kind = "document" if value.dim() == 0 else "step"
                if per not in (None, kind):
                    raise RnnscopeError("the loss gave a scalar for some documents and per-step values for others",
                                        "return one kind for every document")
                per = kind
                T = d.ids.shape[1]
                seeds = ([(T - 1, value)] if i in chosen_docs else []) if per == "document" else \
                    [(t, value[t]) for t in here if torch.isfinite(value[t])]
                for t, L in seeds:
                    _forget_grads(p)
                    L.backward(retain_graph=True)
                    for key in [k for k in p.trace if parse_key(k)["kind"].startswith("grad_")]:
                        reverse = parse_key(key)["reverse"]
                        at = 0 if reverse and per == "document" else t      # where a reverse direction ends
                        ratios = _lag_ratios(p.trace[key][0].detach().double(), at, max_lag, reverse)
                        if ratios is None:
                            zero += 1
                            continue
                        rows.append(pd.DataFrame({"key": key, "document": i, "step": at,
                                                  "lag": np.arange(len(ratios)), "ratio": ratios}))
    finally:
        model.train(was)
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        {"key": [], "document": [], "step": [], "lag": [], "ratio": []})
    frame.attrs.update(per=per, zero_at_lag0=zero)
    return frame


def decay_through(subject, documents, **options) -> pd.DataFrame:
    """``decay_ratios`` summarised per (key, lag) as ``gradient_decay``'s table (``mean``, ``geo_mean``,
    ``q10``, ``q90`` of the ratios, ``positions``, ``nonfinite``), plus ``documents`` (how many reach
    that lag): ``half_lives`` reads it the same way. ``attrs`` are ``decay_ratios``'."""
    ratios = decay_ratios(subject, documents, **options)
    rows = []
    for (key, lag), g in ratios.groupby(["key", "lag"], sort=False):
        col = g["ratio"].to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(col)
        info = parse_key(key)
        rows.append({"key": key, "layer": info["layer"], "kind": info["kind"], "lag": int(lag),
                     **_lag_stats(col, logs), "positions": len(col), "nonfinite": int((~np.isfinite(col)).sum()),
                     "documents": int(g["document"].nunique())})
    curve = pd.DataFrame(rows, columns=["key", "layer", "kind", "lag", "mean", "geo_mean", "q10", "q90",
                                        "positions", "nonfinite", "documents"])
    curve.attrs.update(ratios.attrs)
    return curve.sort_values(["key", "lag"], kind="stable", ignore_index=True)


def _one_loss(values: dict) -> torch.Tensor:
    """The loss to differentiate: the metric's value (the first, of a dict), as a tensor with a graph."""
    value = next(iter(values.values()))
    if not value.requires_grad:
        raise RnnscopeError("the loss does not depend on the model's output (it has no gradient)",
                            "compute the loss from the output it is given (no .detach())")
    return value


def _forget_grads(p: Probe) -> None:
    """Every record's state gradients emptied, so the next backward's are its own."""
    for call in p.calls:
        for key in call:
            call.direction(key).swap_grads({})
    for cell in p.cell_calls:
        cell.swap_grads()


def _lag_ratios(g: torch.Tensor, t: int, max_lag: int, reverse: bool) -> np.ndarray | None:
    """``g [T, units]`` dL/dstate: ``||g[t -/+ k]|| / ||g[t]||`` for k = 0..max_lag inside ``[0, T)``
    (forwards for a reverse direction); None when ``||g[t]||`` is 0."""
    n = g.norm(dim=-1)
    n = n[t:t + max_lag + 1] if reverse else n[:t + 1].flip(0)[:max_lag + 1]
    if n[0] == 0:
        return None
    with np.errstate(all="ignore"):
        return (n / n[0]).numpy()
