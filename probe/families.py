"""One table per recurrent family: what a new RNN variant has to say, in one place.

Each ``Family`` holds its gates in PyTorch's order (and so the state kinds and gradients it
records), whether it has a cell state, the fused PyTorch kernel that runs it, the replay of its
gates from a layer's outputs, its adjoint recurrence, and the cell equations of one step that an
edited layer runs (``probe.engine``).
Everything else (the layer engine, the recorder, the interventions) asks this table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import _VF, nn

from . import adjoint, replay


@dataclass(frozen=True)
class Family:
    """``gate_order``: the gates in PyTorch's row blocks of ``w_ih``/``w_hh`` (each ``H`` rows);
    ``cell_state``: whether the state is ``(h, c)``; ``kernel(module)``: the ``_VF`` function;
    ``replay(p, x, h, h0, c0)``: the states of one direction from its outputs ``h [T, B, P]``
    (``probe.replay``); ``adjoint(module, p, st, h0, c0, grad_out, grad_h_n, grad_c_n, c_at)``:
    ``probe.adjoint``'s dict; ``cell(module, p, pre, h, c, put)``: one step from
    ``pre = W_ih x_t + b_ih`` with every gate and the cell passed through ``put(kind, value)`` (the
    edits) as soon as it is computed, returning ``(h before its edit, c or None)``."""
    name: str
    gate_order: str
    cell_state: bool
    kernel: Callable
    replay: Callable
    adjoint: Callable
    cell: Callable

    @property
    def kinds(self) -> tuple[str, ...]:
        """The recorded state kinds: ``h``, the cell, the gates."""
        return ("h", *("c" if self.cell_state else ""), *self.gate_order)

    @property
    def grad_kinds(self) -> tuple[str, ...]:
        return ("grad_h", "grad_c") if self.cell_state else ("grad_h",)


def _lstm_cell(m, p, pre, h, c, put):
    i, f, g_gate, o = (pre + nn.functional.linear(h, p.w_hh, p.b_hh)).chunk(4, -1)
    i, f = put("i", torch.sigmoid(i)), put("f", torch.sigmoid(f))
    g_gate, o = put("g", torch.tanh(g_gate)), put("o", torch.sigmoid(o))
    c = put("c", f * c + i * g_gate)
    h = o * torch.tanh(c)
    return (h if p.w_hr is None else h @ p.w_hr.T), c


def _gru_cell(m, p, pre, h, c, put):
    """PyTorch's convention: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``."""
    H = m.hidden_size
    a_h = nn.functional.linear(h, p.w_hh, p.b_hh)
    r = put("r", torch.sigmoid(pre[:, :H] + a_h[:, :H]))
    z = put("z", torch.sigmoid(pre[:, H:2 * H] + a_h[:, H:2 * H]))
    n = put("n", torch.tanh(pre[:, 2 * H:] + r * a_h[:, 2 * H:]))
    return (1 - z) * n + z * h, None


def _rnn_cell(m, p, pre, h, c, put):
    a = pre + nn.functional.linear(h, p.w_hh, p.b_hh)
    return (torch.tanh(a) if m.nonlinearity == "tanh" else torch.relu(a)), None


# the replay and adjoint entries look their functions up when called, so a test that swaps one
# out (monkeypatch) is seen
LSTM = Family(
    "LSTM", "ifgo", True,
    kernel=lambda m: _VF.lstm,
    replay=lambda p, x, h, h0, c0: replay.lstm_states(p, x, h, h0, c0),
    adjoint=lambda m, p, st, h0, c0, grad_out, grad_h_n, grad_c_n, c_at:
        adjoint.lstm(p, st, h0, c0, grad_out, grad_h_n, grad_c_n, c_at),
    cell=_lstm_cell)
GRU = Family(
    "GRU", "rzn", False,
    kernel=lambda m: _VF.gru,
    replay=lambda p, x, h, h0, c0: replay.gru_states(p, x, h, h0),
    adjoint=lambda m, p, st, h0, c0, grad_out, grad_h_n, grad_c_n, c_at: adjoint.gru(p, st, h0, grad_out, grad_h_n),
    cell=_gru_cell)
RNN = Family(
    "RNN", "", False,
    kernel=lambda m: _VF.rnn_tanh if m.nonlinearity == "tanh" else _VF.rnn_relu,
    replay=lambda p, x, h, h0, c0: {"h": h},
    adjoint=lambda m, p, st, h0, c0, grad_out, grad_h_n, grad_c_n, c_at:
        adjoint.rnn(p, st, grad_out, grad_h_n, m.nonlinearity == "relu"),
    cell=_rnn_cell)

FAMILIES = {f.name: f for f in (LSTM, GRU, RNN)}
KINDS = {f.name: f.kinds for f in FAMILIES.values()}
GRAD_KINDS = {f.name: f.grad_kinds for f in FAMILIES.values()}
# subclasses first: nn.LSTM and nn.GRU are not nn.RNN subclasses today, but order says which wins
_CLASSES = ((nn.LSTM, LSTM), (nn.GRU, GRU), (nn.RNN, RNN))
MODULES = tuple(cls for cls, _ in _CLASSES)     # the module classes the probe and the engine take


def of(module: nn.Module) -> Family:
    for cls, fam in _CLASSES:
        if isinstance(module, cls):
            return fam
    raise TypeError(f"{type(module).__name__} is not nn.RNN, nn.LSTM or nn.GRU")


def family_name(module: nn.Module) -> str:
    """``'LSTM'``, ``'GRU'`` or ``'RNN'``."""
    return of(module).name


def fused(module: nn.Module, x, h0, c0, weights: list, bias: bool, bidirectional: bool, training: bool = False,
          batch_sizes: torch.Tensor | None = None):
    """One layer (or one direction) through PyTorch's fused kernel: ``x [T, B, in]``, or packed
    data with ``batch_sizes``; ``h0, c0 [D, B, *]`` (``c0`` None but for an LSTM). Returns
    ``(out, h_n, c_n or None)``; the only place the kernels are called."""
    fam = of(module)
    hx = (h0, c0) if fam.cell_state else h0
    head = (x, hx) if batch_sizes is None else (x, batch_sizes, hx)
    tail = (weights, bias, 1, 0.0, training, bidirectional) + ((False,) if batch_sizes is None else ())
    res = fam.kernel(module)(*head, *tail)
    return res if fam.cell_state else (*res, None)
