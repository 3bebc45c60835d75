"""The exact one-step Jacobian of a recurrent layer along a text, from its recorded gates.

For one layer (one direction) the state is ``s_t = (h_t, c_t)`` for an LSTM (``h`` first, ``P + H``
wide with ``proj_size`` P) and ``h_t`` for a GRU or an RNN. With the layer's input ``x_t`` held fixed
(the layer below's output at the same step), ``J_t = ds_t / ds_{t-1}`` has a closed form in the gates
that ``Probe`` records, so it costs a few scaled copies of ``W_hh`` per step and no autograd:

* RNN:  ``h = phi(a)``: ``J = diag(phi'(a)) W_hh`` (``phi' = 1 - h^2`` for tanh, ``[h > 0]`` for relu).
* GRU (PyTorch's ``n = tanh(W_in x + b_in + r * (W_hn h' + b_hn))``), ``h = (1 - z) n + z h'``:
  ``J = diag(z) + diag(h' - n) dz + diag(1 - z) dn`` with ``dz = diag(z(1-z)) W_hz`` and
  ``dn = diag(1 - n^2) (diag(r) W_hn + diag((W_hn h' + b_hn) r(1-r)) W_hr)``.
* LSTM, ``c = f c' + i g``, ``h = W_hr (o tanh c)`` (``W_hr`` the identity without projection):
  ``dc/dh' = diag(c' f(1-f)) W_hf + diag(g i(1-i)) W_hi + diag(i (1-g^2)) W_hg``, ``dc/dc' = diag(f)``,
  ``dh/dh' = W_hr (diag(tanh(c) o(1-o)) W_ho + diag(o (1-tanh^2 c)) dc/dh')``,
  ``dh/dc' = W_hr diag(o (1-tanh^2 c) f)``.

Stacked layers: layer ``l`` at step t reads layer ``l-1`` at step t, never a layer above, so the
Jacobian of the whole stack's state is block lower triangular in layers with these per-layer
Jacobians on its diagonal. Its eigenvalues are the union of the blocks', and the product along a text
stays block lower triangular with the per-layer products on its diagonal; so the spectrum is studied
per layer (``tests/test_jacobian.py`` checks all three on a 2-layer model).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rnnscope.errors import RnnscopeError
from rnnscope.probe import Probe, recurrent_modules, state_key
from rnnscope.probe.families import family_name
from rnnscope.probe.replay import direction_params

CHUNK = 32    # steps per block of Jacobians: 32 x 512 x 512 float64 is 64 MB, the zoo's widest state


@dataclass
class Layer:
    """One recorded direction of one layer, in processing order: ``st[kind] [T, units]`` float64,
    ``h0 [P]``, ``c0 [H]`` (None but for an LSTM) the state before the first step."""
    key: str                 # e.g. ``rnn.l1`` or ``rnn.l0_reverse``: the state keys' prefix
    module: str
    layer: int
    reverse: bool
    family: str
    nonlinearity: str
    w_hh: torch.Tensor
    b_hh: torch.Tensor
    w_hr: torch.Tensor | None
    st: dict
    h0: torch.Tensor
    c0: torch.Tensor | None

    @property
    def steps(self) -> int:
        return self.st["h"].shape[0]

    @property
    def size(self) -> int:
        """The width of the state ``(h, c)`` or ``h``."""
        return self.st["h"].shape[1] + (self.st["c"].shape[1] if self.family == "LSTM" else 0)


def step_jacobians(family: str, w_hh: torch.Tensor, b_hh: torch.Tensor | None, st: dict, h_prev: torch.Tensor,
                   c_prev: torch.Tensor | None = None, w_hr: torch.Tensor | None = None,
                   nonlinearity: str = "tanh") -> torch.Tensor:
    """``J_t = d s_t / d s_{t-1}`` for ``n`` steps: ``st[kind] [n, units]`` the states and gates at
    those steps, ``h_prev [n, P]`` and ``c_prev [n, H]`` the states before each. Returns ``[n, S, S]``
    in the dtype of ``st`` (``S = P + H`` for an LSTM, rows and columns ``(h, c)``)."""
    h = st["h"]
    dt = h.dtype
    W = w_hh.to(dt)
    if family == "RNN":
        d = (1 - h * h) if nonlinearity == "tanh" else (h > 0).to(dt)
        return d[:, :, None] * W
    if family == "GRU":
        r, z, n = st["r"], st["z"], st["n"]
        W_r, W_z, W_n = W.chunk(3)
        b_n = b_hh.to(dt).chunk(3)[2] if b_hh is not None else 0
        a_n = h_prev @ W_n.T + b_n                                  # W_hn h' + b_hn, inside r *
        dz = (z * (1 - z))[:, :, None] * W_z
        dn = (1 - n * n)[:, :, None] * (r[:, :, None] * W_n + (a_n * r * (1 - r))[:, :, None] * W_r)
        return torch.diag_embed(z) + (h_prev - n)[:, :, None] * dz + (1 - z)[:, :, None] * dn
    if family != "LSTM":
        raise RnnscopeError(f"no one-step Jacobian for family {family!r}", "use an RNN, LSTM or GRU layer")
    i, f, g, o, c = st["i"], st["f"], st["g"], st["o"], st["c"]
    W_i, W_f, W_g, W_o = W.chunk(4)
    dc_dh = ((c_prev * f * (1 - f))[:, :, None] * W_f + (g * i * (1 - i))[:, :, None] * W_i
             + (i * (1 - g * g))[:, :, None] * W_g)                  # [n, H, P]
    tc = torch.tanh(c)
    through = o * (1 - tc * tc)                                      # d(o tanh c)/dc
    dh_dh = (tc * o * (1 - o))[:, :, None] * W_o + through[:, :, None] * dc_dh
    dh_dc = torch.diag_embed(through * f)
    if w_hr is not None:                                             # h = W_hr (o tanh c)
        R = w_hr.to(dt)
        dh_dh, dh_dc = R @ dh_dh, R * (through * f)[:, None, :]
    return torch.cat([torch.cat([dh_dh, dh_dc], 2), torch.cat([dc_dh, torch.diag_embed(f)], 2)], 1)


def jacobian_blocks(layer: Layer, start: int = 0, stop: int | None = None, size: int = CHUNK) -> Iterator[torch.Tensor]:
    """``J_t`` for ``start <= t < stop`` in blocks of ``size`` steps (``[n, S, S]`` float64), so a
    long text never holds all of them at once."""
    stop = layer.steps if stop is None else stop
    st, lstm = layer.st, layer.family == "LSTM"
    for t0 in range(start, stop, size):
        t1 = min(stop, t0 + size)
        h_prev = st["h"][t0 - 1:t1 - 1] if t0 > 0 else torch.cat([layer.h0[None], st["h"][:t1 - 1]])
        c_prev = None
        if lstm:
            c_prev = st["c"][t0 - 1:t1 - 1] if t0 > 0 else torch.cat([layer.c0[None], st["c"][:t1 - 1]])
        yield step_jacobians(layer.family, layer.w_hh, layer.b_hh, {k: v[t0:t1] for k, v in st.items()},
                             h_prev, c_prev, layer.w_hr, layer.nonlinearity)


def _usable_weights(model: nn.Module) -> None:
    """Weights with values, all finite: a meta-device model has none, and a NaN weight reached the
    SVD as LinAlgError (a diverged run's checkpoint)."""
    for name, w in model.named_parameters():
        if w.is_meta:
            raise RnnscopeError(f"the model's parameter {name} is on the meta device: it has no values",
                                "load its weights first (e.g. model.to_empty(device='cpu'), then load_state_dict)")
        if w.is_floating_point() and not (ok := torch.isfinite(w)).all():
            bad = int((~ok).sum())
            raise RnnscopeError(f"the model's parameter {name} holds {bad:,} non-finite value{'s' * (bad > 1)}",
                                "training diverged or the checkpoint is damaged; use an earlier checkpoint")


def _finite_states(trace) -> None:
    """Every recorded state finite (an input the model overflows on, or a NaN outside its parameters)."""
    for key in trace:
        ok = torch.isfinite(trace[key][0]).all(-1)
        if not ok.all():
            raise RnnscopeError(f"the model's state {key} is not finite from step {int((~ok).nonzero()[0, 0])} on",
                                "the Jacobians need finite states: check the model's weights and this text")


def recorded_layers(model: nn.Module, ids: torch.Tensor) -> list[Layer]:
    """Run ``model(ids)`` (``ids [1, time]``, one text) once under ``Probe`` and return every
    recurrent layer and direction with its states and gates in float64, in processing order. The
    initial state is zero, as a model called without one starts."""
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise RnnscopeError(f"the Jacobian along a text takes one text (ids [1, time]), got {list(ids.shape)}",
                            "pass one sequence")
    _usable_weights(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), Probe(model) as p:
            model(ids)
    finally:
        model.train(was)
    _finite_states(p.trace)
    layers = []
    for name, m in recurrent_modules(model).items():
        fam = family_name(m)
        for layer in range(m.num_layers):
            for reverse in ((False, True) if m.bidirectional else (False,)):
                key = state_key(name, layer, reverse, "h")[:-2]
                kinds = ("h", "c", "i", "f", "g", "o") if fam == "LSTM" else ("h", "r", "z", "n") if fam == "GRU" else ("h",)
                st = {k: p.trace[f"{key}.{k}"][0].detach().double() for k in kinds}
                if reverse:
                    st = {k: v.flip(0) for k, v in st.items()}
                prm = direction_params(m, layer, reverse)
                P = st["h"].shape[1]
                layers.append(Layer(key, name, layer, reverse, fam, getattr(m, "nonlinearity", "tanh"),
                                    prm.w_hh.detach().double(),
                                    None if prm.b_hh is None else prm.b_hh.detach().double(),
                                    None if prm.w_hr is None else prm.w_hr.detach().double(), st,
                                    torch.zeros(P, dtype=torch.float64),
                                    torch.zeros(m.hidden_size, dtype=torch.float64) if fam == "LSTM" else None))
    return layers
