"""Causal check: edit units during the real forward pass of the unmodified model.

``Intervention(model, edits)`` overrides, for the duration of a ``with`` block, the forward of each
recurrent module that an edit touches (an instance attribute, removed on exit; the weights are the
module's own). Layers without edits run through the fused kernel; an edited layer runs one step at a
time, because an edit at step t changes every later step: the input projection is still one batched
product, the recurrence is the textbook cell, and after each step the edited units are replaced:

    c_t <- where(mask_c, value_c, c_t)     then     h_t = o_t * tanh(c_t)      (LSTM)
    h_t <- where(mask_h, value_h, h_t)                                          (every family)
    gates (i f g o / r z n) are replaced right after their nonlinearity.

Masks and values are ``[batch, units]``: each batch element may edit different units, which is how
``ablate`` runs a unit and its random controls in one batched pass.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from tqdm.auto import tqdm

from rnnscope.probe import packed, parse_key, recurrent_modules
from rnnscope.probe.keys import KINDS, family
from rnnscope.probe.replay import direction_params, initial_state, run_layer, time_major, user_layout
from rnnscope.errors import RnnscopeError


def _module_of(key: str, modules: dict) -> str:
    name = parse_key(key)["module"]
    if name not in modules:
        raise RnnscopeError(f"no recurrent module {name or '<model>'!r} for key {key!r}",
                            f"use a key of {', '.join(repr(n) for n in modules) or 'a probed module'}")
    return name


class Intervention:
    """``with Intervention(model, {"rnn.l1.c": (mask, value)}): model(x)``.

    ``mask``: bool ``[units]`` or ``[batch, units]``; ``value``: a number, ``[units]`` or
    ``[batch, units]`` (what the masked units are set to: 0 to ablate, a mean, a clamp value).
    """

    def __init__(self, model: nn.Module, edits: dict):
        self.model, self.modules = model, recurrent_modules(model)
        self.edits: dict[str, dict] = {}
        for key, (mask, value) in edits.items():
            name = _module_of(key, self.modules)
            m, info = self.modules[name], parse_key(key)
            if info["kind"] not in KINDS[family(m)]:
                raise RnnscopeError(f"{key}: a {family(m)} has no state {info['kind']!r}",
                                    f"edit one of {', '.join(KINDS[family(m)])}")
            if info["layer"] >= m.num_layers or (info["reverse"] and not m.bidirectional):
                raise RnnscopeError(f"{key}: {name or '<model>'} has no such layer or direction",
                                    f"it has {m.num_layers} layer(s){', bidirectional' if m.bidirectional else ''}")
            self.edits.setdefault(name, {})[(info["layer"], info["reverse"], info["kind"])] = (mask, value)

    def __enter__(self) -> "Intervention":
        taken = [n for n in self.edits if "forward" in self.modules[n].__dict__]
        if taken:
            raise RnnscopeError(f"module {taken[0] or '<model>'} already has an instance-level forward "
                                "(a Probe or another Intervention?)", "nest the intervention outside, not inside")
        for name in self.edits:
            m = self.modules[name]
            m.forward = partial(_edited_forward, m, self.edits[name])
        return self

    def __exit__(self, *exc) -> None:
        for name in self.edits:
            self.modules[name].__dict__.pop("forward", None)


def _expand(mask, value, B: int, U: int, like: torch.Tensor):
    mask = torch.as_tensor(mask, dtype=torch.bool, device=like.device)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if mask.shape[-1] != U or mask.dim() > 2 or (mask.dim() == 2 and mask.shape[0] not in (1, B)):
        raise RnnscopeError(f"an edit mask has shape {list(mask.shape)} for {U} units and batch {B}",
                            f"give a bool mask of shape [{U}] or [{B}, {U}]")
    return mask.expand(B, U), value.expand(B, U) if value.dim() else value.expand(B, U)


def _edited_forward(m: nn.Module, edits: dict, input, hx=None):
    if isinstance(input, PackedSequence):
        return _edited_packed(m, edits, input, hx)
    kind = family(m)
    x, unbatched = time_major(m, input)
    D, L = 2 if m.bidirectional else 1, m.num_layers
    h0, c0 = initial_state(m, x, hx, unbatched)
    layer_in, h_ns, c_ns = x, [], []
    for layer in range(L):
        sl = slice(layer * D, (layer + 1) * D)
        mine = {k: v for k, v in edits.items() if k[0] == layer}
        if not mine:
            out, h_n, c_n = run_layer(m, layer, layer_in, (h0[sl], c0[sl]) if c0 is not None else h0[sl])
        else:
            out, h_n, c_n = _edited_layer(m, kind, layer, mine, layer_in, h0[sl], c0[sl] if c0 is not None else None,
                                          lambda t: t.flip(0))
        h_ns.append(h_n)
        c_ns.append(c_n)
        layer_in = out
        if layer < L - 1 and m.dropout and m.training:
            layer_in = nn.functional.dropout(out, m.dropout, True)
    return user_layout(m, layer_in, h_ns, c_ns, unbatched)


def _edited_packed(m: nn.Module, edits: dict, seq: PackedSequence, hx):
    """``_edited_forward`` for sequences of different lengths: unedited layers run fused on the
    packed data; edited ones step through the padded batch (the reverse direction reversed within
    each sequence), each sequence's state frozen past its end so its final state is its own."""
    kind = family(m)
    x_pad, lengths = pad_packed_sequence(seq)
    T = x_pad.shape[0]
    D, L = 2 if m.bidirectional else 1, m.num_layers
    h0, c0 = initial_state(m, x_pad, hx, False)
    rev, alive = packed.reversal(lengths, T), ~packed.past_end(lengths, T)
    h_ns, c_ns = [], []
    for layer in range(L):
        sl = slice(layer * D, (layer + 1) * D)
        mine = {k: v for k, v in edits.items() if k[0] == layer}
        if not mine:
            out, h_n, c_n = packed.run_layer(m, layer, seq, h0[sl], c0[sl] if c0 is not None else None)
        else:
            out_pad, h_n, c_n = _edited_layer(m, kind, layer, mine, packed.padded(seq, T), h0[sl],
                                              c0[sl] if c0 is not None else None,
                                              lambda t: packed.reverse_time(t, rev), alive)
            out = packed.pack_like(out_pad, seq)
        h_ns.append(h_n)
        c_ns.append(c_n)
        seq = out
        if layer < L - 1 and m.dropout and m.training:
            seq = PackedSequence(nn.functional.dropout(out.data, m.dropout, True), out.batch_sizes,
                                 out.sorted_indices, out.unsorted_indices)
    h_n = torch.cat(h_ns, 0)
    return seq, ((h_n, torch.cat(c_ns, 0)) if kind == "LSTM" else h_n)


def _edited_layer(m, kind, layer, mine, x, h0, c0, reverse, alive=None):
    """One layer with edits ``mine`` (``{(layer, rev, kind): (mask, value)}``), each direction step
    by step. ``x [T, B, in]``; ``h0, c0 [D, B, *]``; ``reverse(t)`` maps time order to the reverse
    direction's processing order and back; ``alive`` as in ``_step_direction``.
    Returns ``(out [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None)``."""
    B, H = x.shape[1], m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    outs, hs, cs = [], [], []
    for d in range(2 if m.bidirectional else 1):
        rev = d == 1
        ed = {k[2]: _expand(*v, B, H if k[2] != "h" else P, x) for k, v in mine.items() if k[1] == rev}
        o, hn, cn = _step_direction(m, kind, direction_params(m, layer, rev), reverse(x) if rev else x, h0[d],
                                    c0[d] if c0 is not None else None, ed, alive)
        outs.append(reverse(o) if rev else o)
        hs.append(hn)
        cs.append(cn)
    return torch.cat(outs, -1), torch.stack(hs), (torch.stack(cs) if kind == "LSTM" else None)


def _step_direction(m, kind, p, x, h, c, ed, alive=None):
    """One direction of one layer, step by step, with edits. ``x [T, B, in]``; ``alive [T, B]``
    (packed input): where a sequence has ended its state is carried unchanged. Returns
    ``(out [T, B, P], h_T, c_T)``."""
    def put(k, v):
        if k in ed:
            mask, value = ed[k]
            return torch.where(mask, value, v)
        return v

    pre = nn.functional.linear(x, p.w_ih, p.b_ih)                 # the input side for every step at once
    b_hh = p.b_hh
    H = m.hidden_size
    outs = []
    for t in range(x.shape[0]):
        h_prev, c_prev = h, c
        a_h = nn.functional.linear(h, p.w_hh, b_hh)
        if kind == "LSTM":
            i, f, g, o = (pre[t] + a_h).chunk(4, -1)
            i, f = put("i", torch.sigmoid(i)), put("f", torch.sigmoid(f))
            g, o = put("g", torch.tanh(g)), put("o", torch.sigmoid(o))
            c = put("c", f * c + i * g)
            h = o * torch.tanh(c)
            if p.w_hr is not None:
                h = h @ p.w_hr.T
        elif kind == "GRU":
            a_x = pre[t]
            r = put("r", torch.sigmoid(a_x[:, :H] + a_h[:, :H]))
            z = put("z", torch.sigmoid(a_x[:, H:2 * H] + a_h[:, H:2 * H]))
            n = put("n", torch.tanh(a_x[:, 2 * H:] + r * a_h[:, 2 * H:]))
            h = (1 - z) * n + z * h
        else:
            a = pre[t] + a_h
            h = torch.tanh(a) if m.nonlinearity == "tanh" else torch.relu(a)
        h = put("h", h)
        if alive is not None:
            keep = alive[t].unsqueeze(-1)
            h = torch.where(keep, h, h_prev)
            c = torch.where(keep, c, c_prev) if c is not None else None
        outs.append(h)
    return torch.stack(outs), h, c


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
    m = modules[_module_of(key, modules)]
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
            for g in tqdm(range(0, len(sets), group), desc=f"ablate {units[0]}", unit="group",
                          disable=not progress):
                mk = masks[g:g + group]
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
