"""Causal check: ablate units in the real forward pass and measure the change in loss.

The editing itself is ``rnnscope.probe.Intervention`` (``probe/intervention.py`` says how an edit
runs); ``ablate`` edits a unit and its random controls in one batched pass, each batch element with
its own mask, and compares the change in loss.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rnnscope.errors import RnnscopeError
from rnnscope.probe.intervention import Intervention, module_of
from rnnscope.probe.keys import parse_key, recurrent_modules


def position_mask(text: str, feature: np.ndarray, continuous_at: str = "\n") -> np.ndarray:
    """Where a feature's unit should matter, as positions of the next-character loss (the loss at t
    predicts character t+1 from the state after character t): for a binary feature, the steps inside
    it (which include predicting its closing marker); for a continuous one, the steps whose next
    character is ``continuous_at`` (a newline: line length and column predict where lines end)."""
    feature = np.asarray(feature)
    if set(np.unique(feature)) <= {0, 1}:
        return feature.astype(bool)
    nxt = np.frombuffer(text[1:].encode("utf-32-le"), np.uint32) == ord(continuous_at)
    return np.append(nxt, False)


def ablate(model: nn.Module, ids: torch.Tensor, units: list[str], positions: np.ndarray, *,
           mode: str = "mean", value: float | None = None, means: dict | None = None, controls: int = 100,
           seed: int = 0, group: int = 25, loss_fn=None, progress: bool = False) -> pd.DataFrame:
    """Edit ``units`` (``key:index``; all of one key) over the whole text ``ids [1, time]`` and
    compare the change in next-character loss on ``positions`` (bool ``[time]``) and elsewhere with
    ``controls`` random sets of as many units of the same key.

    ``mode``: ``mean`` (the default: each unit held at its mean over the text, ``means[key]`` or
    measured here; it removes what the unit says without pushing it off its range), ``zero`` or
    ``clamp`` (to ``value``). Returns one row for the units and one per control, with ``effect``
    (mean loss change on the positions), ``effect_elsewhere``; the units' row also holds
    ``effect_size`` (in control standard deviations) and ``p_value`` (share of controls at least as
    large, counting the units themselves).
    """
    keys = {u.rsplit(":", 1)[0] for u in units}
    if len(keys) != 1:
        raise RnnscopeError(f"ablate takes units of one key, got {', '.join(sorted(keys))}", "ablate each key apart")
    key = keys.pop()
    idx = [int(u.rsplit(":", 1)[1]) for u in units]
    modules = recurrent_modules(model)
    m = modules[module_of(key, modules)]
    info = parse_key(key)
    U = (getattr(m, "proj_size", 0) or m.hidden_size) if info["kind"] == "h" else m.hidden_size
    if any(not 0 <= i < U for i in idx):
        raise RnnscopeError(f"unit index out of range for {key} ({U} units): {idx}", f"use 0..{U - 1}")
    positions = np.asarray(positions, bool)
    if positions.shape != (ids.shape[1],):
        raise RnnscopeError(f"positions have shape {list(positions.shape)}, the text {ids.shape[1]} steps",
                            "give one flag per character")
    if not positions[:-1].any() or positions[:-1].all():
        raise RnnscopeError("the positions mark no character (or every one)",
                            "choose a feature that occurs in this text, and not everywhere")
    if mode == "mean":
        if means is None or key not in means:
            means = {key: _mean_state(model, ids, key)}
        fill = torch.as_tensor(np.asarray(means[key], np.float32))
        if fill.shape != (U,):
            raise RnnscopeError(f"means for {key} have shape {list(fill.shape)}, expected [{U}]",
                                "pass one mean per unit (run.units)")
    elif mode == "clamp":
        if value is None:
            raise RnnscopeError("mode 'clamp' needs a value", "pass value=...")
        fill = torch.full((U,), float(value))
    elif mode == "zero":
        fill = torch.zeros(U)
    else:
        raise RnnscopeError(f"unknown mode {mode!r}", "use zero, mean or clamp")
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(U), idx)
    sets = [idx] + [list(rng.choice(others if len(others) >= len(idx) else np.arange(U), len(idx), replace=False))
                    for _ in range(controls)]
    masks = torch.zeros(len(sets), U, dtype=torch.bool)
    for b, s in enumerate(sets):
        masks[b, s] = True
    loss_fn = loss_fn or _next_char_loss
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = loss_fn(model(ids), ids)[0]
            deltas = []
            for start in tqdm(range(0, len(sets), group), desc=f"ablate {units[0]}", unit="group",
                              disable=not progress):
                mk = masks[start:start + group]
                with Intervention(model, {key: (mk, fill.expand_as(mk))}):
                    edited = loss_fn(model(ids.expand(len(mk), -1)), ids.expand(len(mk), -1))
                deltas.append(edited - base)
            delta = torch.cat(deltas).double().numpy()
    finally:
        model.train(was)
    on = positions[:-1]
    effect, elsewhere = delta[:, on].mean(1), delta[:, ~on].mean(1)
    ctrl = effect[1:]
    table = pd.DataFrame({"units": [",".join(f"{key}:{i}" for i in s) for s in sets],
                          "role": ["target"] + ["control"] * controls, "mode": mode,
                          "effect": effect, "effect_elsewhere": elsewhere})
    sd = ctrl.std(ddof=1) if controls > 1 else np.nan
    table["effect_size"] = np.nan
    table["p_value"] = np.nan
    table.loc[0, "effect_size"] = (effect[0] - ctrl.mean()) / sd if sd > 0 else np.nan
    table.loc[0, "p_value"] = (1 + (ctrl >= effect[0]).sum()) / (1 + controls)
    table.loc[0, "beats_controls"] = float((ctrl < effect[0]).mean()) if controls else np.nan
    return table


def _mean_state(model, ids, key) -> np.ndarray:
    from rnnscope.probe import Probe
    with torch.no_grad(), Probe(model, kinds=[parse_key(key)["kind"]]) as p:
        model(ids)
    return p.trace[key][0].mean(0).numpy()


def _next_char_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` nats: the loss at t predicts character t+1."""
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
