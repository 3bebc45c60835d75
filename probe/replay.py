"""Exact per-timestep states and gates of a fused recurrent module, at close to fused speed.

The fused kernel hides everything but the last layer's outputs. Run it one layer at a time
(same weights, same kernel) and every layer's ``h_t`` comes out; with ``h_{t-1}`` and ``x_t``
known for all ``t`` each gate's pre-activation is one batched matrix product, and the LSTM cell
is the linear recurrence ``c_t = f_t * c_{t-1} + i_t * g_t``, a cheap elementwise scan. (An
LSTM on oneDNN skips the replay: its gates are in the kernel's workspace, ``probe.workspace``.)

Everything here is in the time-major layout ``[time, batch, units]``, one direction at a time;
``probe.engine`` converts from and to the user's layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


CHUNK_ROWS = 1024    # rows (steps x batch) per replayed matrix product: small enough that its
                     # output is still in cache for the copy and the scan (measured on 25,600 x 1,024
                     # by 2,048: 242 ms in spans of 1,024 rows against 327 ms in one product)


def _chunks(x: torch.Tensor):
    """``(t0, t1)`` spans of steps, about ``CHUNK_ROWS`` rows each (one span off the CPU)."""
    T, B = x.shape[:2]
    step = T if x.device.type != "cpu" else max(1, CHUNK_ROWS // B)
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _inputs(x: torch.Tensor | None, h, h0, t0: int, t1: int, buf: torch.Tensor) -> torch.Tensor:
    """``[x_t, h_{t-1}]`` for ``t0 <= t < t1`` written into ``buf`` (``[x_t]`` left out when ``x`` is None)."""
    k = 0 if x is None else x.shape[-1]
    out = buf[:t1 - t0]
    if x is not None:
        out[..., :k] = x[t0:t1]
    if t0 == 0:
        out[0, :, k:] = h0
        out[1:, :, k:] = h[:t1 - 1]
    else:
        out[..., k:] = h[t0 - 1:t1 - 1]
    return out


def _rows(b: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if b is None else b[rows]


def shift(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_{t-1}`` for every t: ``[T, B, P]`` from the outputs ``h [T, B, P]`` and ``h0 [B, P]``."""
    return torch.cat([h0.unsqueeze(0), h[:-1]], 0)


def lstm_states(p: DirectionParams, x, h, h0, c0) -> dict[str, torch.Tensor]:
    """LSTM gates ``i f g o`` and cell ``c`` for ``x [T,B,in]``, outputs ``h [T,B,P]``; all ``[T,B,H]``.

    Span by span: the matrix products of ``[x_t, h_{t-1}]`` against ``[W_ih, W_hh]`` give every
    gate, activated by oneDNN as it goes (the sigmoid gates ``i f o`` in one product, ``g`` in
    another), into one buffer of which the gates are views; then the cell recurrence
    ``c_t = f_t c_{t-1} + i_t g_t`` continues over the span while it is in cache."""
    T, B, _ = x.shape
    H = p.w_hh.shape[0] // 4
    w = torch.cat([p.w_ih, p.w_hh], 1)
    b = None if p.b_ih is None else p.b_ih + p.b_hh
    ifo, g_rows = [*range(2 * H), *range(3 * H, 4 * H)], slice(2 * H, 3 * H)     # PyTorch's rows: i f g o
    sig = gemm.Linear(w[ifo], _rows(b, ifo), rows=CHUNK_ROWS, activation="sigmoid")
    tanh = gemm.Linear(w[g_rows], _rows(b, g_rows), rows=CHUNK_ROWS, activation="tanh")
    a = torch.empty(T, B, 4 * H, dtype=x.dtype, device=x.device)      # i f o g, the layout cell_scan reads
    c = torch.empty(T, B, H, dtype=x.dtype, device=x.device)
    spans = _chunks(x)
    buf = x.new_empty(spans[0][1] if spans else 0, B, x.shape[-1] + h.shape[-1])
    prev = c0
    for t0, t1 in spans:
        xh = _inputs(x, h, h0, t0, t1, buf)
        a[t0:t1, :, :3 * H] = sig(xh)
        a[t0:t1, :, 3 * H:] = tanh(xh)
        prev = cell_scan(a[t0:t1], prev, c[t0:t1])     # the only sequential part
    return {"h": h, "c": c, "i": a[..., :H], "f": a[..., H:2 * H], "g": a[..., 3 * H:], "o": a[..., 2 * H:3 * H]}


def gru_states(p: DirectionParams, x, h, h0) -> dict[str, torch.Tensor]:
    """GRU gates ``r z n`` (PyTorch's convention: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``),
    and ``_hn = W_hn h_{t-1} + b_hn``, which the adjoint needs; span by span as ``lstm_states``:
    ``r z`` in one product of ``[x_t, h_{t-1}]``, sigmoid applied by oneDNN."""
    T, B, _ = x.shape
    H = p.w_hh.shape[0] // 3
    rz_rows, n_rows = slice(0, 2 * H), slice(2 * H, 3 * H)
    b_rz = None if p.b_ih is None else p.b_ih[rz_rows] + p.b_hh[rz_rows]
    lin_rz = gemm.Linear(torch.cat([p.w_ih[rz_rows], p.w_hh[rz_rows]], 1), b_rz, rows=CHUNK_ROWS, activation="sigmoid")
    lin_xn = gemm.Linear(p.w_ih[n_rows], _rows(p.b_ih, n_rows), rows=CHUNK_ROWS)
    lin_hn = gemm.Linear(p.w_hh[n_rows], _rows(p.b_hh, n_rows), rows=CHUNK_ROWS)
    rz, n, hn = (torch.empty(T, B, k * H, dtype=x.dtype, device=x.device) for k in (2, 1, 1))
    r, z = rz[..., :H], rz[..., H:]
    spans = _chunks(x)
    buf = x.new_empty(spans[0][1] if spans else 0, B, x.shape[-1] + h.shape[-1])
    for t0, t1 in spans:
        xh = _inputs(x, h, h0, t0, t1, buf)
        rz[t0:t1] = lin_rz(xh)
        hn[t0:t1] = lin_hn(xh[..., x.shape[-1]:])
        torch.tanh(lin_xn(x[t0:t1]).addcmul_(r[t0:t1], hn[t0:t1]), out=n[t0:t1])
    return {"h": h, "r": r, "z": z, "n": n, "_hn": hn}
