"""The sequential parts of the probe as compiled loops (numba) on CPU: the LSTM cell recurrence
``c_t = f_t * c_{t-1} + i_t * g_t`` of the replay, and the adjoint recurrences of the backward.
A Python loop of per-step tensor ops pays the dispatcher for every op of every step, which at
batch 1 dominated the probe's overhead. The LSTM and GRU adjoints compute their coefficients from
the recorded gates inside the loop (as tables they cost more than the loop). For one sequence the
whole loop is compiled, matrix product included; from batch 2 up the elementwise step is compiled
and oneDNN does each step's product (the RNN, whose step is one multiply, keeps tensor ops there).
Other devices and dtypes keep the per-step tensor ops."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit


@njit(cache=True, boundscheck=False)
def _scan(a, prev, out):
    T, B, H4 = a.shape
    H = H4 // 4
    for t in range(T):              # time outermost: each step reads one row of gates
        for b in range(B):
            p, a_tb, o = prev[b], a[t, b], out[t, b]
            for j in range(H):      # contiguous rows, so this loop vectorizes
                v = a_tb[j] * a_tb[3 * H + j] + a_tb[H + j] * p[j]
                p[j] = v
                o[j] = v


def compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops can take these tensors."""
    d = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == d for t in tensors) and d in (torch.float32, torch.float64)


@njit(cache=True, boundscheck=False, inline="always")
def _lstm_adjoint_t(t, grad_out, i, f, g_gate, o, tc, c, c0, next_h, next_c, grad_h, grad_c, d_a):
    """Step ``t`` of the LSTM adjoint, its coefficients computed from the gates on the fly (a
    precomputed table of them cost more than the whole loop)."""
    B, H = next_c.shape
    for b in range(B):
        for j in range(H):
            it, ft, gt, ot, tct = i[t, b, j], f[t, b, j], g_gate[t, b, j], o[t, b, j], tc[t, b, j]
            c_prev = c[t - 1, b, j] if t > 0 else c0[b, j]
            gh = grad_out[t, b, j] + next_h[b, j]               # dL/dh_t
            gc = next_c[b, j] + gh * ot * (1 - tct * tct)       # dL/dc_t
            grad_h[t, b, j] = gh
            grad_c[t, b, j] = gc
            d_a[t, b, 0, j] = gc * gt * it * (1 - it)           # pre-activation gradients, i f g o
            d_a[t, b, 1, j] = gc * c_prev * ft * (1 - ft)
            d_a[t, b, 2, j] = gc * it * (1 - gt * gt)
            d_a[t, b, 3, j] = gh * tct * ot * (1 - ot)
            next_c[b, j] = gc * ft


@njit(cache=True, boundscheck=False)
def _lstm_adjoint(grad_out, i, f, g_gate, o, tc, c, c0, w_hh, next_h, next_c, grad_h, grad_c, d_a):
    T, B, H = grad_c.shape
    for t in range(T - 1, -1, -1):
        _lstm_adjoint_t(t, grad_out, i, f, g_gate, o, tc, c, c0, next_h, next_c, grad_h, grad_c, d_a)
        next_h[:, :] = np.dot(d_a[t].reshape(B, 4 * H), w_hh)


@njit(cache=True, boundscheck=False)
def _lstm_adjoint_step(t, grad_out, i, f, g_gate, o, tc, c, c0, next_h, next_c, grad_h, grad_c, d_a):
    _lstm_adjoint_t(t, grad_out, i, f, g_gate, o, tc, c, c0, next_h, next_c, grad_h, grad_c, d_a)


def lstm_adjoint(grad_out, i, f, g_gate, o, c, c0, w_hh, next_h, next_c, back_hh=None, inject=None):
    """The LSTM adjoint loop of ``probe.adjoint.lstm`` (no projection), compiled. ``grad_out [T,B,H]`` is the
    gradient arriving at the outputs; ``i f g_gate o c [T,B,H]`` the recorded states (views are fine).
    Without ``back_hh`` the whole loop is one compiled call (best for one sequence); with it, each
    step's elementwise part is compiled and ``next_h = back_hh(d_a[t])`` runs in between (oneDNN's
    batched product wins from batch 2 up). ``inject``: ``{step: (sequences, grad)}`` added to the
    cell's gradient before that step (packed input, ``probe.adjoint.lstm``; per-step loop only).
    Returns ``grad_h, grad_c [T,B,H], d_a [T,B,4,H], h0-grad [B,H], c0-grad [B,H]``."""
    T, B, H = c.shape
    grad_h, grad_c = torch.empty(T, B, H, dtype=c.dtype), torch.empty(T, B, H, dtype=c.dtype)
    d_a = torch.empty(T, B, 4, H, dtype=c.dtype)
    tc = torch.tanh(c)
    nh, nc = (t.detach().clone(memory_format=torch.contiguous_format) for t in (next_h, next_c))
    args = [_np(t) for t in (grad_out, i, f, g_gate, o, tc, c, c0.to(c.dtype))]
    out = [_np(t) for t in (grad_h, grad_c, d_a)]
    if back_hh is None:
        assert not inject, "the whole-loop path takes its cell gradient in next_c"
        _lstm_adjoint(*args, _np(w_hh.detach().contiguous()), _np(nh), _np(nc), *out)
        return grad_h, grad_c, d_a, nh, nc
    nc_np = _np(nc)
    for t in range(T - 1, -1, -1):
        if inject and t in inject:
            rows, extra = inject[t]
            nc.index_add_(0, rows, extra.to(nc.dtype))          # in place: nc_np sees it
        _lstm_adjoint_step(t, *args, _np(nh), nc_np, *out)
        nh = back_hh(d_a[t].view(B, 4 * H))
    return grad_h, grad_c, d_a, nh, nc


@njit(cache=True, boundscheck=False, inline="always")
def _gru_adjoint_t(t, grad_out, r, z, n, hn, h, h0, next_h, grad_h, d_x, d_h):
    """Step ``t`` of the GRU adjoint (PyTorch's convention, ``n = tanh(x_n + r * hn)``), its
    coefficients computed from the gates on the fly. ``next_h`` gets the part through ``z``."""
    B, H = next_h.shape
    for b in range(B):
        for j in range(H):
            rt, zt, nt, hnt = r[t, b, j], z[t, b, j], n[t, b, j], hn[t, b, j]
            h_prev = h[t - 1, b, j] if t > 0 else h0[b, j]
            gh = grad_out[t, b, j] + next_h[b, j]               # dL/dh_t
            grad_h[t, b, j] = gh
            d_n = gh * (1 - zt) * (1 - nt * nt)                  # n's pre-activation
            d_r = d_n * hnt * rt * (1 - rt)
            d_z = gh * (h_prev - nt) * zt * (1 - zt)
            d_x[t, b, 0, j] = d_r
            d_x[t, b, 1, j] = d_z
            d_x[t, b, 2, j] = d_n
            d_h[t, b, 0, j] = d_r
            d_h[t, b, 1, j] = d_z
            d_h[t, b, 2, j] = d_n * rt                          # hidden side: the pre-activation holds r * hn
            next_h[b, j] = gh * zt


@njit(cache=True, boundscheck=False)
def _gru_adjoint(grad_out, r, z, n, hn, h, h0, w_hh, next_h, grad_h, d_x, d_h):
    T, B, H = grad_h.shape
    for t in range(T - 1, -1, -1):
        _gru_adjoint_t(t, grad_out, r, z, n, hn, h, h0, next_h, grad_h, d_x, d_h)
        next_h += np.dot(d_h[t].reshape(B, 3 * H), w_hh)


@njit(cache=True, boundscheck=False)
def _gru_adjoint_step(t, grad_out, r, z, n, hn, h, h0, next_h, grad_h, d_x, d_h):
    _gru_adjoint_t(t, grad_out, r, z, n, hn, h, h0, next_h, grad_h, d_x, d_h)


@njit(cache=True, boundscheck=False)
def _rnn_adjoint(grad_out, k, w_hh, next_h, grad_h, d_a):
    T, B, H = grad_h.shape
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for j in range(H):
                gh = grad_out[t, b, j] + next_h[b, j]
                grad_h[t, b, j] = gh
                d_a[t, b, j] = gh * k[t, b, j]
        next_h[:, :] = np.dot(d_a[t], w_hh)


def _np(x: torch.Tensor):
    return x.detach().numpy()


def gru_adjoint(grad_out, r, z, n, hn, h, h0, w_hh, next_h, back_hh=None):
    """``probe.adjoint.gru``'s loop compiled, as ``lstm_adjoint`` (``back_hh``: oneDNN does each step's
    product). Returns ``grad_h [T,B,H], d_x, d_h [T,B,3,H], h0-grad [B,H]``."""
    T, B, H = h.shape
    grad_h = torch.empty(T, B, H, dtype=h.dtype)
    d_x, d_h = torch.empty(T, B, 3, H, dtype=h.dtype), torch.empty(T, B, 3, H, dtype=h.dtype)
    nh = next_h.detach().clone(memory_format=torch.contiguous_format)
    args = [_np(t) for t in (grad_out, r, z, n, hn, h, h0.to(h.dtype))]
    out = [_np(t) for t in (grad_h, d_x, d_h)]
    if back_hh is None:
        _gru_adjoint(*args, _np(w_hh.detach().contiguous()), _np(nh), *out)
        return grad_h, d_x, d_h, nh
    for t in range(T - 1, -1, -1):
        _gru_adjoint_step(t, *args, _np(nh), *out)
        nh = nh + back_hh(d_h[t].view(B, 3 * H))
    return grad_h, d_x, d_h, nh


def rnn_adjoint(grad_out, k, w_hh, next_h):
    """``probe.adjoint.rnn``'s loop in one compiled call: ``grad_h, d_a [T,B,H], h0-grad``."""
    grad_h, d_a = torch.empty(k.shape, dtype=grad_out.dtype), torch.empty(k.shape, dtype=grad_out.dtype)
    nh = next_h.detach().clone().contiguous()
    _rnn_adjoint(_np(grad_out), _np(k), _np(w_hh.detach().contiguous()), _np(nh), _np(grad_h), _np(d_a))
    return grad_h, d_a, nh


def cell_scan(a: torch.Tensor, c0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``c_t = f_t * c_{t-1} + i_t * g_t`` into ``out [T, B, H]`` from the activated gates
    ``a [T, B, 4H]`` laid out ``i f o g`` and ``c0 [B, H]``; returns the last ``c`` (``c0`` when ``T`` is 0)."""
    H = out.shape[-1]
    if compiled(out, a) and len(out) and a.is_contiguous() and out.is_contiguous():
        prev = c0.detach().to(out.dtype).clone(memory_format=torch.contiguous_format)
        _scan(_np(a), prev.numpy(), _np(out))
        return prev
    i, f, g_gate = a[..., :H], a[..., H:2 * H], a[..., 3 * H:]
    prev = c0
    for t in range(len(out)):
        prev = torch.addcmul(i[t] * g_gate[t], f[t], prev, out=out[t])
    return prev
