"""Total derivatives of the loss with respect to every ``h_t`` and ``c_t``, by the adjoint recurrence.

Autograd through the fused kernel gives only the *external* gradient ``g_t = dL/dh_t`` that
arrives from above (the next layer or the head); the kernel keeps the part that flows back through
the recurrence to itself. With the gates recorded, that part is a backward recurrence whose step
is linear in the adjoint, so every coefficient is precomputed in one batched pass and the loop
does one matrix-vector product and two or three elementwise ops per step.

All tensors are time-major in processing order ``[T, B, *]`` (flip the reverse direction first).
``gh_n``/``gc_n`` are the gradients arriving at the returned final state (``[B, *]`` or None).
"""
from __future__ import annotations

import torch

from .replay import DirectionParams, shift


def _zeros_like_last(x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(x[-1]) if g is None else g


def lstm(p: DirectionParams, st: dict, h0, c0, g, gh_n=None, gc_n=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_h [T,B,P], grad_c [T,B,H])`` for an LSTM direction with recorded ``i f g o c``."""
    i, f, gg, o, c = st["i"], st["f"], st["g"], st["o"], st["c"]
    tc = torch.tanh(c)
    k_c = o * (1 - tc * tc)                                   # dh->dc through h = o*tanh(c)
    k_ifg = torch.stack([gg * i * (1 - i), shift(c, c0) * f * (1 - f), i * (1 - gg * gg)], dim=2)  # [T,B,3,H]
    k_o = tc * o * (1 - o)
    T, B, H = c.shape
    grad_h, grad_c = torch.empty_like(g), torch.empty_like(c)
    next_h = _zeros_like_last(g, gh_n)        # what flows into h_T from outside the sequence
    next_c = _zeros_like_last(c, gc_n)
    w_hh, w_hr = p.w_hh, p.w_hr
    for t in range(T - 1, -1, -1):
        h_t = torch.add(g[t], next_h, out=grad_h[t])
        dm = h_t if w_hr is None else h_t @ w_hr              # projection: h = W_hr (o * tanh c)
        c_t = torch.addcmul(next_c, dm, k_c[t], out=grad_c[t])
        d_a = torch.cat([(c_t.unsqueeze(1) * k_ifg[t]).flatten(1), dm * k_o[t]], dim=1)   # dL/d(pre-activations)
        next_h = d_a @ w_hh
        next_c = c_t * f[t]
    return grad_h, grad_c


def gru(p: DirectionParams, st: dict, h0, g, gh_n=None) -> torch.Tensor:
    """``grad_h [T,B,H]`` for a GRU direction with recorded ``r z n`` (and ``_hn = W_hn h + b_hn``)."""
    r, z, n, hn, h = st["r"], st["z"], st["n"], st["_hn"], st["h"]
    dn = (1 - z) * (1 - n * n)
    k = torch.stack([dn * hn * r * (1 - r), (shift(h, h0) - n) * z * (1 - z), dn * r], dim=2)   # [T,B,3,H]
    grad_h = torch.empty_like(g)
    next_h = _zeros_like_last(g, gh_n)
    for t in range(len(g) - 1, -1, -1):
        h_t = torch.add(g[t], next_h, out=grad_h[t])
        next_h = torch.addmm(h_t * z[t], (h_t.unsqueeze(1) * k[t]).flatten(1), p.w_hh)
    return grad_h


def rnn(p: DirectionParams, st: dict, g, gh_n=None, relu: bool = False) -> torch.Tensor:
    """``grad_h [T,B,H]`` for an Elman RNN direction (tanh or relu)."""
    h = st["h"]
    k = (h > 0).to(h.dtype) if relu else 1 - h * h
    grad_h = torch.empty_like(g)
    next_h = _zeros_like_last(g, gh_n)
    for t in range(len(g) - 1, -1, -1):
        h_t = torch.add(g[t], next_h, out=grad_h[t])
        next_h = (h_t * k[t]) @ p.w_hh
    return grad_h
