"""Why a gradient vanishes or explodes: the spectrum of the one-step Jacobians along a text.

``lyapunov(blocks, k)``: the leading ``k`` Lyapunov exponents of the product ``J_T ... J_1`` by QR
re-orthonormalisation (Engelken, Wolf & Abbott 2020; Vogt et al. 2022): carry an orthonormal
``Q [S, k]``, factor ``J_t Q = Q' R`` at every step and sum ``log |R_ii|``; the exponent is that sum
over the steps, in nats per step. The explicit product is never formed: its small singular values
underflow after a few dozen steps while the QR sums stay exact.

``spectrum(model, ids)``: per layer, the exponents, the singular values of the one-step Jacobians,
and the link to the measured decay. A gradient ``dL_t / ds_{t-k}`` of layer ``l`` multiplies the
transposed Jacobians of every layer from ``l`` to the top (the loss reads the top layer, and a layer
feeds only the layers above it), so it shrinks like ``exp(k * max_{m >= l} lambda_1^m)``: a negative
rate predicts a half-life of ``ln 2 / |lambda|`` steps, set against the half-life that
``analysis.gradflow`` fits to the measured decay curve of the same text.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .gradflow import gradient_decay, half_lives
from .jacobian import Layer, jacobian_blocks, recorded_layers


def lyapunov(blocks: Iterable[torch.Tensor], k: int, *, skip: int = 0, seed: int = 0) -> np.ndarray:
    """The leading ``k`` exponents (nats per step, descending) of the product of the Jacobians in
    ``blocks`` (each ``[n, S, S]``, in step order). The first ``skip`` steps only turn ``Q`` from its
    random start towards the growing directions and are not counted. ``-inf`` where the product has
    rank below ``k`` (a relu layer with dead units)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # a step is one small QR: 0.19 ms on one thread, 11 ms on two
    try:                            # (32 x 3, measured on a loaded 2-core machine)
        return _qr_exponents(blocks, k, skip, seed)
    finally:
        torch.set_num_threads(threads)


def _qr_exponents(blocks, k: int, skip: int, seed: int) -> np.ndarray:
    Q, total, steps = None, None, 0
    for J in blocks:
        if Q is None:
            S = J.shape[-1]
            if not 1 <= k <= S:
                raise ValueError(f"k must be in 1..{S}, got {k}")
            g = torch.Generator().manual_seed(seed)
            Q = torch.linalg.qr(torch.randn(S, k, generator=g, dtype=J.dtype)).Q
            total = torch.zeros(k, dtype=torch.float64)
        for Jt in J:
            Q, R = torch.linalg.qr(Jt @ Q)
            if steps >= skip:
                total += torch.log(torch.diagonal(R).abs().double())
            steps += 1
    if Q is None or steps <= skip:
        raise ValueError(f"no steps left to average over ({steps} steps, skip {skip})")
    return np.sort((total / (steps - skip)).numpy())[::-1].copy()


def singular_values(layer: Layer, samples: int = 100) -> np.ndarray:
    """``[samples, S]``: the singular values (descending) of ``J_t`` at ``samples`` steps spread
    evenly over the text (an SVD of a 512-wide Jacobian takes ~50 ms, so not every step of a long text)."""
    steps = np.unique(np.linspace(0, layer.steps - 1, min(samples, layer.steps)).round().astype(int))
    out = [torch.linalg.svdvals(next(jacobian_blocks(layer, t, t + 1))[0]) for t in steps]
    return torch.stack(out).numpy()


def layer_exponents(layer: Layer, k: int, *, skip: int | None = None, seed: int = 0) -> np.ndarray:
    """``lyapunov`` along one recorded layer; ``skip`` defaults to a tenth of the text, at most 100."""
    skip = min(100, layer.steps // 10) if skip is None else skip
    return lyapunov(jacobian_blocks(layer), min(k, layer.size), skip=skip, seed=seed)


def predicted_half_life(rate: float) -> float:
    """``ln 2 / -rate`` steps for a shrinking rate; inf when it does not shrink."""
    return float(np.log(2) / -rate) if rate < 0 else np.inf


def spectrum(model: nn.Module, ids: torch.Tensor, *, k: int = 8, samples: int = 100, measure: bool = True,
             max_lag: int = 200, warmup: int = 50, positions: int = 256, seed: int = 0,
             progress: bool = False) -> pd.DataFrame:
    """One row per recurrent layer (and direction) of ``model`` over one text ``ids [1, time]``:
    ``key, family, state, steps, exponents`` (the leading ``k``), ``lambda_1``, ``reach`` (the
    largest ``lambda_1`` from this layer to the top: the rate the gradient reaching this layer
    shrinks at), ``predicted_half_life``, the one-step singular values' ``sv_max_median``,
    ``sv_max_q90``, ``sv_above_1`` (share of sampled steps whose largest singular value exceeds 1:
    a step that can stretch some direction), ``sv_median`` (median over steps and directions);
    with ``measure``, ``measured_half_life`` (and ``measured_half_life_c`` for an LSTM's cell) and
    ``fit_r2`` from ``gradflow.gradient_decay`` on the same text, fitted over lags 1..max_lag, and
    the same fitted over the second half of the lags alone (``measured_tail_half_life``, ...)."""
    rows = []
    for layer in recorded_layers(model, ids):
        ex = layer_exponents(layer, k, seed=seed)
        sv = singular_values(layer, samples)
        rows.append({"key": layer.key, "module": layer.module, "layer": layer.layer, "family": layer.family,
                     "state": layer.size, "steps": layer.steps, "exponents": ex.tolist(), "lambda_1": float(ex[0]),
                     "sv_max_median": float(np.median(sv[:, 0])), "sv_max_q90": float(np.quantile(sv[:, 0], 0.9)),
                     "sv_above_1": float((sv[:, 0] > 1).mean()), "sv_median": float(np.median(sv))})
    table = pd.DataFrame(rows)
    table["reach"] = [table[(table.module == r.module) & (table.layer >= r.layer)]["lambda_1"].max()
                      for r in table.itertuples()]
    table["predicted_half_life"] = table["reach"].map(predicted_half_life)
    if measure:
        curve = gradient_decay(model, ids, positions=positions, max_lag=max_lag, warmup=warmup, seed=seed,
                               progress=progress)
        # the exponent is the asymptotic rate; the fit over all lags also sees the fast directions
        # dying out first, so the second half of the curve is fitted on its own too
        for col, start in (("", 1), ("tail_", max_lag // 2)):
            hl = half_lives(curve, start=start).set_index("key")
            pick = lambda key, c: float(hl.loc[key, c]) if key in hl.index else np.nan  # noqa: E731
            table[f"measured_{col}half_life"] = [pick(f"{k_}.grad_h", "half_life") for k_ in table.key]
            table[f"measured_{col}half_life_c"] = [pick(f"{k_}.grad_c", "half_life") for k_ in table.key]
            table[f"{col}fit_r2"] = [pick(f"{k_}.grad_h", "fit_r2") for k_ in table.key]
    return table


SHOWN_COLUMNS = {"key": "layer", "family": "family", "exponents": "leading exponents", "reach": "reach",
                 "predicted_half_life": "predicted", "measured_half_life": "measured h",
                 "measured_half_life_c": "measured c", "measured_tail_half_life": "tail h",
                 "measured_tail_half_life_c": "tail c", "sv_max_median": "median sv_max", "sv_above_1": "sv_max>1"}


def spectrum_report(table, chars: int, max_lag: int) -> str:
    """What ``rnnscope spectrum`` prints of ``spectrum``'s table."""
    shown = table.assign(exponents=[" ".join(f"{x:+.3f}" for x in v) for v in table.exponents])
    return (f"{chars:,} characters; exponents in nats per step, QR re-orthonormalised; a layer's gradient "
            "shrinks at its reach (the largest lambda_1 from it to the top), predicting ln 2 / |reach| steps; "
            f"measured: half-life fitted to the decay over lags 1..{max_lag}, tail: over lags "
            f"{max_lag // 2}..{max_lag}\n"
            + shown[list(SHOWN_COLUMNS)].rename(columns=SHOWN_COLUMNS).to_string(index=False,
                                                                                  float_format=lambda v: f"{v:.3g}"))


def spectrum_json(table) -> str:
    """``spectrum --json``: one object per layer, non-finite numbers as null."""
    import json
    import math

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    rows = [{k: ([clean(x) for x in v] if isinstance(v, list) else clean(v)) for k, v in r.items()}
            for r in table.to_dict(orient="records")]
    return json.dumps(rows, indent=1)
