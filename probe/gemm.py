"""``x @ W.T (+ b)`` through oneDNN on the CPU.

The fused RNN kernels on CPU run on oneDNN; PyTorch's plain ``mm`` runs on MKL, which takes a
slow path on AMD processors (measured on this project's 2-core EPYC machines: 55-64 GFLOP/s for
MKL against 85-146 for oneDNN, benchmarks/probe_overhead.py). The probe replays the fused
kernel's matrix products, so it must run them on the same library to keep up with it. Anything
oneDNN cannot take (other devices, float64, no oneDNN build) goes through ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACK = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
MIN_MACS = 1 << 24     # below this a call's layout conversions cost more than oneDNN saves (and a
                       # batch-1 matrix-vector product is memory-bound either way)


def _usable(t: torch.Tensor) -> bool:
    return _ONEDNN and t.device.type == "cpu" and t.dtype == torch.float32


_ACTIVATIONS = {None: None, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class Linear:
    """A weight ``W [out, in]`` prepared once, applied to many ``x [..., in] -> [..., out]``,
    optionally followed by ``activation`` (``"sigmoid"`` or ``"tanh"``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int | None = None,
                 activation: str | None = None):
        """``rows``: the usual number of rows of ``x``; given, the weight is reordered once into
        oneDNN's blocked layout for that size (measured: 10% faster over many calls). oneDNN applies
        the activation to the product's tiles while they are in registers, which saves a pass
        over the output."""
        self.weight, self.bias = weight, bias
        self.activation, self._act = activation or "none", _ACTIVATIONS[activation]
        self.fast = _usable(weight) and weight.numel() >= 1 << 16
        if self.fast:      # dense in, dense out: no layout conversions of the activations
            self._w = weight.detach().contiguous()
            if rows is not None and _PACK:
                self._w = torch.ops.mkldnn._reorder_linear_weight(self._w, rows)
            self._b = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast and _usable(x)) or x.requires_grad or x.numel() * self.weight.shape[0] < MIN_MACS:
            y = F.linear(x, self.weight, self.bias)
            return y if self._act is None else self._act(y)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, self._w, self._b, self.activation, [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return Linear(weight, bias)(x)


_BACKWARD_WEIGHTS = _ONEDNN and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights")
WIDE = 256     # from this many columns of b up, oneDNN's product repays converting b to its layout


def t_matmuls(a: torch.Tensor, *bs: torch.Tensor) -> list[torch.Tensor]:
    """``[a.T @ b for b in bs]`` for ``a [N, M]``, each ``b [N, K]``: weight gradients summed over
    N = time x batch, several against the same ``a``.

    Plain ``mm`` (MKL) takes the transpose for free but runs at about 200 GFLOP/s on AMD. oneDNN's
    inner-product backward runs nearer 380 once its operands are in oneDNN's layout; ``a`` is
    converted once for all ``bs``, so wide ``b`` go there (measured at 25,600 x 2,048 by 25,600 x 512:
    273 ms on MKL, 140 ms on oneDNN plus 15 ms to convert ``b``, and 60 ms once for ``a``). Narrow
    ``b`` (a small embedding's input side) stay on ``mm``."""
    wide = [_BACKWARD_WEIGHTS and _usable(a) and _usable(b) and b.shape[1] >= WIDE
            and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS for b in bs]
    a_onednn = a.contiguous().to_mkldnn() if any(wide) else None
    out = []
    for b, w in zip(bs, wide):
        if w:
            shape_only = a.new_empty(a.shape[1], b.shape[1])
            out.append(torch.ops.aten.mkldnn_linear_backward_weights(a_onednn, b.contiguous().to_mkldnn(),
                                                                      shape_only, False)[0])
        else:
            out.append(a.t() @ b)
    return out


def t_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ b`` for ``a [N, M]``, ``b [N, K]``; see ``t_matmuls``."""
    return t_matmuls(a, b)[0]
