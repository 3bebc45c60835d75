"""One direction of one layer as an autograd Function whose backward *is* the adjoint recurrence.

Forward: the fused kernel (one layer, one direction) and the gate replay, both without a graph.
Backward: the adjoint recurrence over the recorded gates gives ``dL/dh_t`` and ``dL/dc_t`` for
every step (stored in the probe's record) and the pre-activation gradients, from which the input,
initial-state and weight gradients are a few batched matrix products. The fused kernel's own
backward never runs: the probe's gradients cost about what the plain backward costs, and cuDNN's
refusal to run RNN backward in eval mode never arises.
"""
from __future__ import annotations

import torch

from . import families, gemm, packed, workspace
from .replay import DirectionParams, shift


def fused_direction(module, p: DirectionParams, x, h0, c0):
    """``x [T,B,in]`` (processing order) through the fused kernel for one direction of one layer:
    ``(out [T,B,P], h_n [B,P], c_n [B,H] or None)``."""
    w = [p.w_ih, p.w_hh] + ([p.b_ih, p.b_hh] if p.b_ih is not None else []) + ([p.w_hr] if p.w_hr is not None else [])
    out, h_n, c_n = families.fused(module, x, h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0), w,
                                   p.b_ih is not None, False)
    return out, h_n[0], (c_n[0] if c_n is not None else None)


class RecordedDirection(torch.autograd.Function):
    """``apply(rec, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) -> (out, h_n, c_n)``; ``rec`` receives
    the states in forward and the state gradients in backward. With ``rec.ends [B]`` (packed
    input, padded) the final states are each sequence's at its own last step."""

    @staticmethod
    def forward(ctx, rec, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        p = DirectionParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        fused = None
        if c0 is not None and workspace.usable(x, p):      # an LSTM on oneDNN: states from its workspace
            fused = workspace.lstm_forward(p, x, h0, c0, graph=False)
        if fused is not None:
            out, h_n, c_n, rec.st = fused
        else:
            out, h_n, c_n = fused_direction(rec.module, p, x, h0, c0)
            # detached: `out` itself becomes the Function's output and gets a grad_fn once we return
            rec.st = families.of(rec.module).replay(p, x, out.detach(), h0, c0)
        if rec.ends is not None:        # packed input: each sequence's final state is at its own end
            h_n = packed.at_ends(out, rec.ends)
            c_n = packed.at_ends(rec.st["c"], rec.ends) if c_n is not None else None
        ctx.rec, ctx.p = rec, p
        ctx.save_for_backward(x, h0)
        return out, h_n, (c_n if c_n is not None else h_n.new_zeros(0))

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        rec, p = ctx.rec, ctx.p
        x, h0 = ctx.saved_tensors
        family = families.of(rec.module)
        c_at = None
        if rec.ends is not None:        # the final states' gradients enter at each sequence's end
            grad_out = grad_out.index_put((rec.ends, torch.arange(len(rec.ends))), grad_h_n, accumulate=True)
            grad_h_n, c_at, grad_c_n = None, ((rec.ends, grad_c_n) if family.cell_state else None), None
        a = family.adjoint(rec.module, p, rec.st, h0, rec.c0, grad_out, grad_h_n, grad_c_n, c_at)
        rec.add_grads({k: a[k] for k in ("grad_h", "grad_c") if k in a})
        need = ctx.needs_input_grad
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        d_x, d_h = a["d_x"], a["d_h"]
        grads = [None] * 9
        if need[1]:
            grads[1] = gemm.linear(d_x, p.w_ih.t())
        if need[2]:
            grads[2] = a["h0"]
        if need[3]:
            grads[3] = a.get("c0")
        if need[4] and need[5] and d_x is d_h:          # LSTM, RNN: both weights share one gradient
            grads[4], grads[5] = gemm.t_matmuls(flat(d_x), flat(x), flat(shift(rec.st["h"], h0)))
        else:
            if need[4]:
                grads[4] = gemm.t_matmul(flat(d_x), flat(x))
            if need[5]:
                grads[5] = gemm.t_matmul(flat(d_h), flat(shift(rec.st["h"], h0)))
        if need[6]:
            grads[6] = d_x.sum((0, 1))
        if need[7]:
            grads[7] = d_h.sum((0, 1))
        if need[8]:
            m = rec.st["o"] * torch.tanh(rec.st["c"])
            grads[8] = gemm.t_matmul(flat(a["grad_h"]), flat(m))
        return tuple(grads)
