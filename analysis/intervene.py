"""Causal check: ablate units in the real forward pass and measure the change in loss.

The editing itself is ``rnnscope.probe.Intervention`` (``probe/intervention.py`` says how an edit
runs); ``ablate`` edits a unit and its random controls in one batched pass, each batch element with
its own mask, and compares the change in loss. Any other model (a ``Subject``: a classifier, a
tagger, a word model) is edited while its own ``call`` runs each document, and the change is in the
user's metric (its loss, an accuracy): ``ablate_documents``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rnnscope.errors import RnnscopeError
from rnnscope.probe.intervention import Intervention, editable_modules, module_of
from rnnscope.probe.keys import parse_key
from rnnscope.probe.subject import subject_of


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


def ablate(model, ids, units: list[str], positions: np.ndarray | None = None, *,
           mode: str = "mean", value: float | None = None, means: dict | None = None, controls: int = 100,
           seed: int = 0, group: int = 25, loss_fn=None, metric=None, progress: bool = False) -> pd.DataFrame:
    """Edit ``units`` (``key:index``; all of one key) over the whole text ``ids [1, time]`` and
    compare the change in next-character loss on ``positions`` (bool ``[time]``) and elsewhere with
    ``controls`` random sets of as many units of the same key.

    ``mode``: ``mean`` (the default: each unit held at its mean over the text, ``means[key]`` or
    measured here; it removes what the unit says without pushing it off its range), ``zero`` or
    ``clamp`` (to ``value``). Returns one row for the units and one per control, with ``effect``
    (mean loss change on the positions), ``effect_elsewhere``; the units' row also holds
    ``effect_size`` (in control standard deviations) and ``p_value`` (share of controls at least as
    large, counting the units themselves), and the controls' ``control_mean``, ``control_sd``,
    ``control_q05``, ``control_q50``, ``control_q95``.

    Given a ``Subject`` (or a zoo ``Checkpoint``) instead of a model, ``ids`` are its documents and the
    change is in ``metric`` (default the Subject's loss), through its ``call``: see ``ablate_documents``.
    """
    if not isinstance(model, nn.Module):
        return ablate_documents(model, ids, units, positions, metric=metric, mode=mode, value=value, means=means,
                                controls=controls, seed=seed, progress=progress)
    key, idx, U = _target(model, units)
    positions = np.asarray(positions, bool)
    if positions.shape != (ids.shape[1],):
        raise RnnscopeError(f"positions have shape {list(positions.shape)}, the text {ids.shape[1]} steps",
                            "give one flag per character")
    if not positions[:-1].any() or positions[:-1].all():
        raise RnnscopeError("the positions mark no character (or every one)",
                            "choose a feature that occurs in this text, and not everywhere")
    fill = _fill(mode, value, means, key, U, lambda: _mean_state(model, ids, key))
    sets, masks = _sets(idx, U, controls, seed)
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
    table = pd.DataFrame({"units": [",".join(f"{key}:{i}" for i in s) for s in sets],
                          "role": ["target"] + ["control"] * controls, "mode": mode,
                          "effect": effect, "effect_elsewhere": elsewhere})
    return _compared(table, effect, signed=True)


def ablate_documents(subject, documents, units: list[str], positions: np.ndarray | None = None, *, metric=None,
                     mode: str = "mean", value: float | None = None, means: dict | None = None,
                     controls: int = 100, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """``ablate`` for any model: ``units`` (of one key) edited while the Subject's ``call`` runs each of
    ``documents`` (what ``record`` takes, or ``calls.run_documents(run)``), one whole document per
    call, and ``controls`` random sets of as many units of that key edited the same way.

    ``metric``: ``fn(output, ids [T][, document=])`` -> a scalar per document, a per-step ``[T]``, or a
    dict of them (``{"loss": ..., "accuracy": ...}``); default the Subject's loss. ``positions``: bool
    over the documents' steps in order (a per-step metric) or over the documents (a scalar one); the
    effect is the mean change there and ``effect_elsewhere`` over the rest (default everywhere, and NaN).
    ``means``: ``{key: [units]}`` (a Run's ``run.units``), else measured over the documents. Returns
    ``ablate``'s table with a row per metric and unit set (``metric`` names it, ``baseline`` is its
    unedited mean on the positions); ``p_value``, ``effect_size`` and ``beats_controls`` compare the
    size of the change, ``|effect|``, with the controls' (a unit may matter by lowering a loss too)."""
    from .calls import Doc, encoded, forward, measure, metric_of
    subject = subject_of(subject)
    docs = documents if isinstance(documents, list) and documents and all(isinstance(d, Doc) for d in documents) \
        else encoded(subject, documents)
    model = subject.model
    key, idx, U = _target(model, units)
    fill = _fill(mode, value, means, key, U, lambda: _mean_over(subject, docs, key))
    fill = fill.to(next(model.parameters()).dtype)[None]
    sets, masks = _sets(idx, U, controls, seed)
    fn = metric_of(subject, metric)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = [measure(fn, forward(subject, d), d) for d in docs]
            edited = []
            for b in tqdm(range(len(sets)), desc=f"ablate {units[0]}", unit="set", disable=not progress):
                with Intervention(model, {key: (masks[b:b + 1], fill)}):
                    edited.append([measure(fn, forward(subject, d), d) for d in docs])
    finally:
        model.train(was)
    tables = []
    for name in base[0]:
        b0 = _joined([m[name] for m in base], name)
        delta = np.stack([_joined([m[name] for m in e], name) for e in edited]) - b0      # [sets, values]
        on = np.ones(len(b0), bool) if positions is None else np.asarray(positions, bool)
        if on.shape != b0.shape or not on.any():
            raise RnnscopeError(f"positions have shape {list(on.shape)} ({int(on.sum())} marked), the metric "
                                f"{name!r} {len(b0)} values", "mark at least one of its steps (or documents)")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # a step without a loss is NaN
            effect = np.nanmean(delta[:, on], 1)
            elsewhere = np.nanmean(delta[:, ~on], 1) if (~on).any() else np.full(len(sets), np.nan)
            baseline = float(np.nanmean(b0[on]))
        table = pd.DataFrame({"units": [",".join(f"{key}:{i}" for i in s) for s in sets],
                              "role": ["target"] + ["control"] * controls, "mode": mode, "metric": name,
                              "effect": effect, "effect_elsewhere": elsewhere, "baseline": baseline})
        tables.append(_compared(table, effect, signed=False))
    return pd.concat(tables, ignore_index=True)


def _joined(values: list, name: str) -> np.ndarray:
    """One document's values after another: ``[documents]`` scalars or ``[steps]`` per-step values."""
    dims = {np.ndim(v) for v in values}
    if len(dims) != 1:
        raise RnnscopeError(f"the metric {name!r} gave a scalar for some documents and per-step values for others",
                            "return one kind for every document")
    return np.asarray(values, np.float64) if dims == {0} else np.concatenate(values).astype(np.float64)


def _target(model: nn.Module, units: list[str]) -> tuple[str, list[int], int]:
    """The one key of ``units``, their indices, and the key's width; refused if out of range."""
    if isinstance(units, str) or not units:
        raise RnnscopeError(f"units must be a list of KEY:INDEX, got {units!r}", "pass e.g. ['rnn.l0.c:3']")
    keys = {u.rsplit(":", 1)[0] for u in units}
    if len(keys) != 1:
        raise RnnscopeError(f"ablate takes units of one key, got {', '.join(sorted(keys))}", "ablate each key apart")
    key = keys.pop()
    idx = [int(u.rsplit(":", 1)[1]) for u in units]
    modules = editable_modules(model)          # fused modules and cells (a step loop's)
    m = modules[module_of(key, modules)]
    info = parse_key(key)
    U = (getattr(m, "proj_size", 0) or m.hidden_size) if info["kind"] == "h" else m.hidden_size
    if any(not 0 <= i < U for i in idx):
        raise RnnscopeError(f"unit index out of range for {key} ({U} units): {idx}", f"use 0..{U - 1}")
    return key, idx, U


def _fill(mode: str, value, means, key: str, U: int, measured) -> torch.Tensor:
    """``[U]``: what the edited units are set to (``measured()`` gives the mean when ``means`` lacks it)."""
    if mode == "mean":
        fill = torch.as_tensor(np.asarray(means[key] if means is not None and key in means else measured(),
                                          np.float32))
        if fill.shape != (U,):
            raise RnnscopeError(f"means for {key} have shape {list(fill.shape)}, expected [{U}]",
                                "pass one mean per unit (run.units)")
        return fill
    if mode == "clamp":
        if value is None:
            raise RnnscopeError("mode 'clamp' needs a value", "pass value=...")
        return torch.full((U,), float(value))
    if mode == "zero":
        return torch.zeros(U)
    raise RnnscopeError(f"unknown mode {mode!r}", "use zero, mean or clamp")


def _sets(idx: list[int], U: int, controls: int, seed: int) -> tuple[list, torch.Tensor]:
    """The units and ``controls`` random sets of as many other units; masks ``[1 + controls, U]``."""
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(U), idx)
    sets = [idx] + [list(rng.choice(others if len(others) >= len(idx) else np.arange(U), len(idx), replace=False))
                    for _ in range(controls)]
    masks = torch.zeros(len(sets), U, dtype=torch.bool)
    for b, s in enumerate(sets):
        masks[b, s] = True
    return sets, masks


def _compared(table: pd.DataFrame, effect: np.ndarray, *, signed: bool) -> pd.DataFrame:
    """The target's row (row 0) against the controls (the rest): effect size, p-value, the share of
    controls it beats, and the controls' distribution; on ``|effect|`` unless ``signed``."""
    size = effect if signed else np.abs(effect)
    ctrl, controls = size[1:], len(size) - 1
    sd = ctrl.std(ddof=1) if controls > 1 else np.nan
    for col in ("effect_size", "p_value", "beats_controls", "control_mean", "control_sd", "control_q05",
                "control_q50", "control_q95"):
        table[col] = np.nan
    table.loc[0, "effect_size"] = (size[0] - ctrl.mean()) / sd if sd > 0 else np.nan
    table.loc[0, "p_value"] = (1 + (ctrl >= size[0]).sum()) / (1 + controls)
    table.loc[0, "beats_controls"] = float((ctrl < size[0]).mean()) if controls else np.nan
    if controls:
        table.loc[0, ["control_mean", "control_sd"]] = effect[1:].mean(), sd
        table.loc[0, ["control_q05", "control_q50", "control_q95"]] = np.quantile(effect[1:], [0.05, 0.5, 0.95])
    return table


def _mean_over(subject, docs, key: str) -> np.ndarray:
    """``[units]``: ``key``'s mean over every step of ``docs``, each run through the Subject's call."""
    from rnnscope.probe import Probe
    from .calls import forward
    with torch.no_grad(), Probe(subject.model, kinds=[parse_key(key)["kind"]]) as p:
        for d in docs:
            forward(subject, d)
        if key not in p.trace:
            raise RnnscopeError(f"the model's call records no {key}", f"ablate a key of {', '.join(list(p.trace)[:6])}")
        return p.trace[key][0].double().mean(0).numpy()         # the documents' calls joined along time


def _mean_state(model, ids, key) -> np.ndarray:
    from rnnscope.probe import Probe
    with torch.no_grad(), Probe(model, kinds=[parse_key(key)["kind"]]) as p:
        model(ids)
    return p.trace[key][0].mean(0).numpy()


def _next_char_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` nats: the loss at t predicts character t+1."""
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
