"""Exact per-timestep states and gates of a fused recurrent module, at close to fused speed.

The fused kernel hides everything but the last layer's outputs. Run it one layer at a time
(same weights, same kernel) and every layer's ``h_t`` comes out; with ``h_{t-1}`` and ``x_t``
known for all ``t`` each gate's pre-activation is one batched matrix product, and the LSTM cell
is the linear recurrence ``c_t = f_t * c_{t-1} + i_t * g_t``, a cheap elementwise scan.

Everything here is in the time-major layout ``[time, batch, units]``, one direction at a time;
the hook module converts from and to the user's layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import _VF, nn

from . import gemm
from .scan import cell_scan


@dataclass
class DirectionParams:
    """One direction of one layer: ``w_ih [G*H, in]``, ``w_hh [G*H, P]``, biases ``[G*H]`` or None,
    ``w_hr [P, H]`` (LSTM ``proj_size``) or None."""
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None = None


def direction_params(module: nn.Module, layer: int, reverse: bool) -> DirectionParams:
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"
    get = lambda n: getattr(module, n + sfx, None)  # noqa: E731
    return DirectionParams(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr"))


def layer_weights(module: nn.Module, layer: int) -> list[torch.Tensor]:
    """The module's flat weights for one layer, both directions, in the order ``_VF`` expects."""
    names = [n for n in module._flat_weights_names if n.split("_l")[-1].split("_")[0] == str(layer)]
    return [getattr(module, n) for n in names]


def run_layer(module: nn.Module, layer: int, x: torch.Tensor, hx):
    """One layer through the fused kernel. ``x [T, B, in]``; ``hx`` is ``h0`` or ``(h0, c0)`` with
    ``[D, B, *]``. Returns ``(out [T, B, D*P], h_n, c_n or None)``."""
    w = layer_weights(module, layer)
    args = (module.bias, 1, 0.0, module.training, module.bidirectional, False)
    if isinstance(module, nn.LSTM):
        out, h_n, c_n = _VF.lstm(x, hx, w, *args)
        return out, h_n, c_n
    if isinstance(module, nn.GRU):
        out, h_n = _VF.gru(x, hx, w, *args)
    elif module.nonlinearity == "tanh":
        out, h_n = _VF.rnn_tanh(x, hx, w, *args)
    else:
        out, h_n = _VF.rnn_relu(x, hx, w, *args)
    return out, h_n, None


def _pre(w_ih, b_ih, w_hh, b_hh, x, h, h0, hidden_apart: bool = False):
    """Gate pre-activations for all steps at once, ``[T, B, G*H]``: ``W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``.

    One matrix product over ``[x_t, h_{t-1}]`` against ``[W_ih, W_hh]``. With ``hidden_apart`` the
    hidden part comes back separately (the GRU needs ``W_hn h + b_hn`` alone).
    """
    h_prev = shift(h, h0)
    if hidden_apart:
        return gemm.linear(x, w_ih, b_ih), gemm.linear(h_prev, w_hh, b_hh)
    bias = None if b_ih is None else b_ih + b_hh
    return gemm.linear(torch.cat([x, h_prev], -1), torch.cat([w_ih, w_hh], 1), bias)


def shift(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_{t-1}`` for every t: ``[T, B, P]`` from the outputs ``h [T, B, P]`` and ``h0 [B, P]``."""
    return torch.cat([h0.unsqueeze(0), h[:-1]], 0)


def lstm_states(p: DirectionParams, x, h, h0, c0) -> dict[str, torch.Tensor]:
    """LSTM gates ``i f g o`` and cell ``c`` for ``x [T,B,in]``, outputs ``h [T,B,P]``; all ``[T,B,H]``.
    The gates are views into one buffer, activated in place."""
    a = _pre(p.w_ih, p.b_ih, p.w_hh, p.b_hh, x, h, h0)
    H = a.shape[-1] // 4
    i, f, g, o = a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]
    a[..., :2 * H].sigmoid_()
    g.tanh_()
    o.sigmoid_()
    c = cell_scan(f, i * g, c0)     # the only sequential part
    return {"h": h, "c": c, "i": i, "f": f, "g": g, "o": o}


def gru_states(p: DirectionParams, x, h, h0) -> dict[str, torch.Tensor]:
    """GRU gates ``r z n`` (PyTorch's convention: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``)."""
    a_x, a_h = _pre(p.w_ih, p.b_ih, p.w_hh, p.b_hh, x, h, h0, hidden_apart=True)
    H = a_x.shape[-1] // 3
    rz = a_x[..., :2 * H].add_(a_h[..., :2 * H]).sigmoid_()
    r, z = rz[..., :H], rz[..., H:]
    hn = a_h[..., 2 * H:]
    n = a_x[..., 2 * H:].addcmul_(r, hn).tanh_()
    return {"h": h, "r": r, "z": z, "n": n, "_hn": hn}


def states(module: nn.Module, p: DirectionParams, x, h, h0, c0=None) -> dict[str, torch.Tensor]:
    if isinstance(module, nn.LSTM):
        return lstm_states(p, x, h, h0, c0)
    if isinstance(module, nn.GRU):
        return gru_states(p, x, h, h0)
    return {"h": h}


def time_major(m: nn.Module, input: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The module's input in ``[time, batch, features]``, and whether it came unbatched."""
    unbatched = input.dim() == 2
    return (input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if m.batch_first else input)), unbatched


def initial_state(m: nn.Module, x: torch.Tensor, hx, unbatched: bool):
    """``(h0 [L*D, B, P], c0 [L*D, B, H] or None)``: the caller's, or zeros."""
    lstm = isinstance(m, nn.LSTM)
    D, L, H = 2 if m.bidirectional else 1, m.num_layers, m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    if hx is None:
        return x.new_zeros(L * D, x.shape[1], P), (x.new_zeros(L * D, x.shape[1], H) if lstm else None)
    h0, c0 = hx if lstm else (hx, None)
    if unbatched:
        h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
    return h0, c0


def user_layout(m: nn.Module, output: torch.Tensor, h_ns: list, c_ns: list, unbatched: bool):
    """Per-layer final states and the time-major output, back in the module's own return layout."""
    h_n = torch.cat(h_ns, 0)
    state = (h_n, torch.cat(c_ns, 0)) if isinstance(m, nn.LSTM) else h_n
    if unbatched:
        output = output.squeeze(1)
        state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
    elif m.batch_first:
        output = output.transpose(0, 1)
    return output, state
