"""The LSTM cell recurrence ``c_t = f_t * c_{t-1} + (i*g)_t``, the one sequential part of the replay,
as a compiled loop (numba) on CPU: a Python loop of per-step tensor ops costs ~5 us a step, which
at batch 1 was a third of the probe's overhead. Other devices keep the per-step tensor ops."""
from __future__ import annotations

import torch
from numba import njit


@njit(cache=True, boundscheck=False)
def _scan(f, ig, c0, out):
    T, B, H = f.shape
    prev = c0.copy()
    for t in range(T):              # time outermost: each step reads one contiguous row of f and ig
        for b in range(B):
            for j in range(H):
                prev[b, j] = ig[t, b, j] + f[t, b, j] * prev[b, j]
                out[t, b, j] = prev[b, j]


def cell_scan(f: torch.Tensor, ig: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """``f, ig [T, B, H]``, ``c0 [B, H]`` -> ``c [T, B, H]``."""
    c = torch.empty(ig.shape, dtype=ig.dtype, device=ig.device)
    if c.device.type == "cpu" and c.dtype in (torch.float32, torch.float64) and len(c):
        _scan(f.detach().numpy(), ig.detach().numpy(), c0.detach().to(c.dtype).numpy(), c.numpy())
        return c
    prev = c0
    for t in range(len(c)):
        prev = torch.addcmul(ig[t], f[t], prev, out=c[t])
    return c
