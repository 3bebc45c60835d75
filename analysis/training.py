"""What a watch log says about training: how far back through time the gradient reaches, step by step.

``training_summary(log)`` reads the decay table a ``Watch`` wrote (``||dL_T/dh_{T-k}||`` for the loss at the
last timestep, 1 at lag 0) and gives, for a few training steps and every state key, the half-life (first lag
below 1/2), the reach (first lag below ``floor``: beyond it the gradient says practically nothing about the
past), the loss, and the clipping events and largest gradient norm up to that step.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rnnscope.probe.watch import half_life

COLUMNS = ["step", "key", "loss", "half_life", "reach", "lags", "clips_so_far", "max_grad_norm_so_far"]


def first_below(norm: np.ndarray, floor: float) -> float:
    """The first lag where ``norm [lags]`` falls below ``floor``; NaN if it never does within the sequence."""
    below = np.flatnonzero(np.asarray(norm) < floor)
    return float(below[0]) if len(below) else float("nan")


def chosen_steps(steps: np.ndarray, points: int) -> list[int]:
    """``points`` watched steps spread evenly over training, the first and the last among them."""
    steps = np.unique(np.asarray(steps, np.int64))
    if len(steps) <= points:
        return steps.tolist()
    return steps[np.unique(np.linspace(0, len(steps) - 1, points).round().astype(int))].tolist()


def training_summary(log, points: int = 6, floor: float = 0.01) -> pd.DataFrame:
    """One row per chosen watched step and state key (``rnn.l0.grad_h``, ``rnn.l0.grad_c`` ...).

    Args:
        log: an opened watch log (``rnnscope.store.watchlog.open_watch_log``).
        points: how many watched steps to report, spread over training.
        floor: the reach is the first lag where the normalised gradient norm falls below it.
    Returns:
        columns ``step key loss half_life reach lags clips_so_far max_grad_norm_so_far``; ``lags`` is how many
        lags were measured (the sequence length), so a NaN reach means "further than ``lags``".
    """
    decay, steps = log.decay, log.steps
    if decay.empty or steps.empty:
        return pd.DataFrame(columns=COLUMNS)
    steps = steps.sort_values("step")
    finite = steps["grad_norm"].where(np.isfinite(steps["grad_norm"]))
    running = pd.DataFrame({"step": steps["step"].to_numpy(), "loss": steps["loss"].to_numpy(),
                            "clips_so_far": steps["clips"].fillna(0).cumsum().to_numpy(np.int64),
                            "max_grad_norm_so_far": finite.cummax().to_numpy()}).drop_duplicates("step", keep="last")
    rows = []
    for step in chosen_steps(decay["step"], points):
        at = decay[decay["step"] == step]
        for key, curve in at.groupby("key", sort=True):
            norm = curve.sort_values("lag")["norm"].to_numpy(np.float64)
            rows.append({"step": step, "key": key, "half_life": half_life(norm), "reach": first_below(norm, floor),
                         "lags": len(norm)})
    out = pd.DataFrame(rows).merge(running, on="step", how="left")
    return out[COLUMNS]


def training_report(log, path) -> str:
    """What ``rnnscope analyze LOG`` prints: the half-life and reach of the gradient at a few steps."""
    from rnnscope.errors import escaped
    table = training_summary(log)
    if table.empty:
        return f"{path}: no watched step with a gradient decay yet"
    lines = [f"{path}: {len(log.steps)} watched steps, up to step {int(log.steps.step.max())}; half-life and reach "
             f"(first lag below 1%) of ||dL_T/dh_(T-k)|| over k < {int(table.lags.max())}",
             f"{'step':>7} {'key':<24} {'loss':>7} {'half-life':>9} {'reach':>6} {'clips':>6} {'max |g|':>9}"]
    for r in table.itertuples():
        reach = f"{r.reach:6.0f}" if r.reach == r.reach else f"{'>' + str(r.lags - 1):>6}"
        lines.append(f"{r.step:>7} {escaped(r.key, limit=24):<24} {r.loss:7.3f} {r.half_life:9.2f} {reach} "
                     f"{r.clips_so_far:>6} {r.max_grad_norm_so_far:9.3g}")
    return "\n".join(lines)
