"""Total derivatives of the loss with respect to every ``h_t`` and ``c_t``, by the adjoint recurrence.

Given the gradients arriving at a direction's outputs from outside (``grad_out [T,B,P]`` from the next
layer or the head, ``grad_h_n``/``grad_c_n`` at the returned final state), the gradient that flows back
through the recurrence is a backward recurrence whose step is linear in the adjoint. Every
coefficient is precomputed in one batched pass, so the loop does one matrix product and two or
three elementwise ops per step. The loop also yields the pre-activation gradients, from which the
input, initial-state and weight gradients are batched matrix products (``probe.autograd``).

All tensors are time-major in processing order ``[T, B, *]`` (the reverse direction is flipped).
Each function returns a dict: ``grad_h``, (LSTM) ``grad_c``, ``d_x`` and ``d_h`` (gradients of the
input-side and hidden-side pre-activations, ``[T, B, G*H]``), ``h0`` and (LSTM) ``c0``.
"""
from __future__ import annotations

import torch

from . import gemm
from .replay import DirectionParams, shift
from .scan import compiled, gru_adjoint, lstm_adjoint, rnn_adjoint


def _start(grad_out: torch.Tensor, grad_n: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(grad_out[-1]) if grad_n is None else grad_n


def _cell_injections(c_at) -> dict:
    """``c_at = (ends [B], grad [B, H])`` as ``{step: (sequences, grad [k, H])}``."""
    if c_at is None:
        return {}
    ends, grad = c_at
    return {int(t): ((ends == t).nonzero()[:, 0], grad[ends == t]) for t in ends.unique()}


def lstm(p: DirectionParams, st: dict, h0, c0, grad_out, grad_h_n=None, grad_c_n=None, c_at=None) -> dict:
    """LSTM direction with recorded ``i f g o c``; handles ``proj_size`` (``h = W_hr (o * tanh c)``).
    ``c_at = (ends [B], grad [B, H])`` (packed input) gives each sequence's cell a gradient at its
    own last step, in place of ``grad_c_n`` at the batch's last."""
    i, f, g_gate, o, c = st["i"], st["f"], st["g"], st["o"], st["c"]
    T, B, H = c.shape
    inject = _cell_injections(c_at)
    if B == 1 and inject:               # one sequence ends at the last step: the usual start
        (t, (_, grad_c_n)), inject = next(iter(inject.items())), {}
        assert t == T - 1
    next_h, next_c = _start(grad_out, grad_h_n), _start(c, grad_c_n)
    if p.w_hr is None and compiled(grad_out, i, f, g_gate, o, c, p.w_hh, next_h, next_c):
        # one sequence (what `record` runs): the whole loop compiled. From batch 2 up oneDNN's batched
        # products win (measured: batch 4 0.86 s compiled vs 0.62 s): only the elementwise step is compiled
        back_hh = None if B == 1 else gemm.Linear(p.w_hh.t())
        grad_h, grad_c, d_a, next_h, next_c = lstm_adjoint(grad_out, i, f, g_gate, o, c, c0, p.w_hh, next_h, next_c,
                                                           back_hh, inject)
        d_a = d_a.view(T, B, 4 * H)
        return {"grad_h": grad_h, "grad_c": grad_c, "d_x": d_a, "d_h": d_a, "h0": next_h, "c0": next_c}
    tc = torch.tanh(c)
    k_c = o * (1 - tc * tc)                                   # dm -> dc through m = o * tanh(c)
    k_ifg = torch.stack([g_gate * i * (1 - i), shift(c, c0) * f * (1 - f), i * (1 - g_gate * g_gate)],
                        dim=2)                                                      # [T,B,3,H]
    k_o = tc * o * (1 - o)
    grad_h, grad_c = torch.empty_like(grad_out), torch.empty_like(c)
    d_a = c.new_empty(T, B, 4, H)
    back_hh = gemm.Linear(p.w_hh.t())                       # d_a @ W_hh
    w_hr = p.w_hr
    for t in range(T - 1, -1, -1):
        if t in inject:
            rows, extra = inject[t]
            next_c = next_c.index_add(0, rows, extra)
        h_t = torch.add(grad_out[t], next_h, out=grad_h[t])
        dm = h_t if w_hr is None else h_t @ w_hr
        c_t = torch.addcmul(next_c, dm, k_c[t], out=grad_c[t])
        torch.mul(c_t.unsqueeze(1), k_ifg[t], out=d_a[t, :, :3])
        torch.mul(dm, k_o[t], out=d_a[t, :, 3])
        next_h = back_hh(d_a[t].view(B, 4 * H))
        next_c = c_t * f[t]
    d_a = d_a.view(T, B, 4 * H)
    return {"grad_h": grad_h, "grad_c": grad_c, "d_x": d_a, "d_h": d_a, "h0": next_h, "c0": next_c}


def gru(p: DirectionParams, st: dict, h0, grad_out, grad_h_n=None) -> dict:
    """GRU direction with recorded ``r z n`` and ``_hn = W_hn h + b_hn`` (PyTorch's convention)."""
    r, z, n, hn, h = st["r"], st["z"], st["n"], st["_hn"], st["h"]
    T, B, H = h.shape
    next_h = _start(grad_out, grad_h_n)
    if compiled(grad_out, r, z, n, hn, h, p.w_hh, next_h):     # as in lstm(): the whole loop compiled at batch 1
        back_hh = None if B == 1 else gemm.Linear(p.w_hh.t())
        grad_h, d_x, d_h, next_h = gru_adjoint(grad_out, r, z, n, hn, h, h0, p.w_hh, next_h, back_hh)
        return {"grad_h": grad_h, "d_x": d_x.view(T, B, 3 * H), "d_h": d_h.view(T, B, 3 * H), "h0": next_h}
    dn = (1 - z) * (1 - n * n)                                 # dh -> d(n pre-activation)
    k_r, k_z = dn * hn * r * (1 - r), (shift(h, h0) - n) * z * (1 - z)
    k_hid = torch.stack([k_r, k_z, dn * r], dim=2)            # hidden side: n's pre-activation holds r * hn
    grad_h = torch.empty_like(grad_out)
    d_h = h.new_empty(T, B, 3, H)
    back_hh = gemm.Linear(p.w_hh.t())
    for t in range(T - 1, -1, -1):
        h_t = torch.add(grad_out[t], next_h, out=grad_h[t])
        torch.mul(h_t.unsqueeze(1), k_hid[t], out=d_h[t])
        next_h = back_hh(d_h[t].view(B, 3 * H)).addcmul_(h_t, z[t])
    d_x = (grad_h.unsqueeze(2) * torch.stack([k_r, k_z, dn], dim=2)).view(T, B, 3 * H)
    return {"grad_h": grad_h, "d_x": d_x, "d_h": d_h.view(T, B, 3 * H), "h0": next_h}


def rnn(p: DirectionParams, st: dict, grad_out, grad_h_n=None, relu: bool = False) -> dict:
    """Elman RNN direction, tanh or relu."""
    h = st["h"]
    k = (h > 0).to(h.dtype) if relu else 1 - h * h
    next_h = _start(grad_out, grad_h_n)
    if h.shape[1] == 1 and compiled(grad_out, k, p.w_hh, next_h):
        grad_h, d_a, next_h = rnn_adjoint(grad_out, k, p.w_hh, next_h)
        return {"grad_h": grad_h, "d_x": d_a, "d_h": d_a, "h0": next_h}
    grad_h, d_a = torch.empty_like(grad_out), torch.empty_like(h)
    back_hh = gemm.Linear(p.w_hh.t())
    for t in range(len(grad_out) - 1, -1, -1):
        h_t = torch.add(grad_out[t], next_h, out=grad_h[t])
        next_h = back_hh(torch.mul(h_t, k[t], out=d_a[t]))
    return {"grad_h": grad_h, "d_x": d_a, "d_h": d_a, "h0": next_h}
