"""An LSTM layer's gates and cells read in place from oneDNN's training workspace (CPU).

PyTorch runs ``nn.LSTM`` on the CPU through oneDNN, one layer and direction at a time
(``aten::mkldnn_rnn_layer``). With grad mode on, that is oneDNN's *training* forward, which keeps
every step's activated gates and cell states in a workspace for its own backward, and PyTorch
hands the workspace back as bytes. Read in place it gives the probe every gate and cell of the
layer for the price of the fused forward alone: no replayed matrix product, no cell scan, no
fresh buffer for the gates (measured in benchmarks/probe_overhead.py).

The layout is oneDNN's internal one (``src/cpu/rnn/rnn_utils``: page-aligned regions for the
gates, the layer states and the cell states, leading dimensions padded away from multiples of
256), not a public contract. So every call checks it against the kernel's own outputs: the cell
recurrence ``c_t = f_t c_{t-1} + i_t g_t`` and ``h_t = o_t tanh(c_t)`` must hold at the first, a
middle and the last step. A layout that fails the check (another oneDNN, another CPU) is never
read: the caller falls back to the replay of ``probe.replay``, and a warning says so once.
"""
from __future__ import annotations

import warnings

import torch

_OP = getattr(torch.ops.aten, "mkldnn_rnn_layer", None) if torch.backends.mkldnn.is_available() else None
_LSTM = 2            # ideep::rnn_kind::LSTM
_PAGE = 1024         # oneDNN aligns each workspace region to 4,096 bytes: 1,024 floats
_warned = False
ENABLED = True       # False forces the replay (to compare the two paths, as the tests do)


def usable(x: torch.Tensor, p) -> bool:
    """Whether ``x [T, B, in]`` and the direction's weights ``p`` can take this path."""
    tensors = [x, p.w_ih, p.w_hh] + [b for b in (p.b_ih, p.b_hh) if b is not None]
    return (ENABLED and _OP is not None and torch._C._get_mkldnn_enabled() and p.w_hr is None
            and x.dim() == 3 and x.shape[0] > 0 and x.shape[1] > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def _good_ld(n: int) -> int:
    """oneDNN's padded leading dimension in floats: a multiple of 16, never of 256."""
    ld = -(-n // 16) * 16
    return ld + 16 if ld % 256 == 0 else ld


def _page(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _views(ws: torch.Tensor, T: int, B: int, I: int, H: int):
    """``(gates [T, B, 4H] in PyTorch's order i f g o, cells [T, B, H])``, views of the workspace
    ``ws`` (bytes); None when it is too small to hold the layout."""
    if ws.numel() % 4 or ws.storage_offset() % 4:
        return None
    f = ws.view(torch.float32)
    gld = _good_ld(4 * H)
    states = 2 * (T + 1) * B * _good_ld(max(I, H))          # [layer 0 (the input), layer 1][T + 1][B]
    base = _page(_page(_page(T * B * gld) + states) + T * B * _good_ld(H))
    start = base + (T + 2) * B * H                           # cell slab 1, step 1: c_0
    if start + T * B * H > f.numel():
        return None
    return f[:T * B * gld].view(T, B, gld)[..., :4 * H], f[start:start + T * B * H].view(T, B, H)


def _consistent(gates: torch.Tensor, c: torch.Tensor, c0: torch.Tensor, out: torch.Tensor) -> bool:
    T, H = len(c), c.shape[-1]
    for t in sorted({0, T // 2, T - 1}):
        i, f, g_gate, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
        prev = c0 if t == 0 else c[t - 1]
        if not (torch.allclose(f * prev + i * g_gate, c[t], rtol=1e-4, atol=1e-5)
                and torch.allclose(o * torch.tanh(c[t]), out[t], rtol=1e-4, atol=1e-5)):
            return False
    return True


def lstm_forward(p, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, graph: bool):
    """One LSTM direction through the fused kernel, ``x [T, B, in]`` in processing order,
    ``h0, c0 [B, H]``. Returns ``(out [T, B, H], h_n [B, H], c_n [B, H], states)`` where ``states``
    holds ``h c i f g o``, each ``[T, B, H]``; or None when the workspace's layout is not the
    expected one. ``graph``: record the call for autograd (its backward is PyTorch's own)."""
    global _warned
    T, B, I = x.shape
    H = p.w_hh.shape[1]
    bias = p.b_ih is not None
    w = [p.w_ih, p.w_hh, p.b_ih, p.b_hh] if bias else [p.w_ih, p.w_hh, *(x.new_zeros(4 * H),) * 2]
    args = [x.contiguous(), *w, h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()]
    if not graph:
        args = [a.detach() for a in args]
    with torch.enable_grad():            # grad mode is what selects oneDNN's training forward
        out, h_n, c_n, ws = _OP(*args, False, [], _LSTM, H, 1, bias, False, False, True)
    views = _views(ws, T, B, I, H) if ws.numel() else None
    if views is not None:
        gates, c = views
        if graph:       # autograd saved the workspace for the kernel's own backward: leave it as it is
            c = torch.cat([c[:T - 1], c_n.detach()])
        else:           # the last cell goes to c_n only; its slot is ours to fill
            c[T - 1] = c_n[0].detach()
        if _consistent(gates, c, c0.detach(), out.detach()):
            st = {"h": out.detach(), "c": c}
            st.update({k: gates[..., n * H:(n + 1) * H] for n, k in enumerate("ifgo")})
            return out, h_n[0], c_n[0], st
    if not _warned:
        _warned = True
        warnings.warn("rnnscope: this oneDNN's LSTM workspace has a layout the probe does not know; "
                      "replaying the gates instead (exact, but slower)", RuntimeWarning, stacklevel=3)
    return None
