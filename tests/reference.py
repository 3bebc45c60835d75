"""An independent float64 reference: the recurrence unrolled one step at a time, from the textbook
equations (not from rnnscope's code), with a zero perturbation added to every h_t and c_t so that
autograd gives the total derivative of the loss with respect to each state."""
from __future__ import annotations

import torch
from torch import nn


def _params(m, layer, rev):
    sfx = f"_l{layer}{'_reverse' if rev else ''}"
    get = lambda n: (getattr(m, n + sfx).double() if getattr(m, n + sfx, None) is not None else None)  # noqa
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def unrolled(m: nn.Module, x: torch.Tensor, hx=None, perturb: bool = False, edits=None):
    """Run module ``m`` on ``x`` (its own layout) in float64, one step at a time. ``edits``:
    ``{(layer, rev, kind): (mask [B, units], value [B, units])}`` replaces those units of that state
    or gate at every step, right after it is computed. Returns
    ``(out [B,T,*], states {(layer, rev, kind): [B,T,units]}, deltas {(layer, rev, kind): [B,T,units]})``."""
    lstm, gru = isinstance(m, nn.LSTM), isinstance(m, nn.GRU)
    x = x.double()
    if not m.batch_first:
        x = x.transpose(0, 1)
    B, T, _ = x.shape
    D, H = 2 if m.bidirectional else 1, m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    states, deltas, layer_in = {}, {}, x
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            rev = d == 1
            w_ih, w_hh, b_ih, b_hh, w_hr = _params(m, layer, rev)
            b_ih = b_ih if b_ih is not None else torch.zeros(w_ih.shape[0], dtype=torch.float64)
            b_hh = b_hh if b_hh is not None else torch.zeros(w_hh.shape[0], dtype=torch.float64)
            idx = layer * D + d
            h = hx[0][idx].double() if lstm and hx is not None else hx[idx].double() if hx is not None else torch.zeros(B, P, dtype=torch.float64)
            c = hx[1][idx].double() if lstm and hx is not None else torch.zeros(B, H, dtype=torch.float64)
            rec = {k: [None] * T for k in ("h", "c", "i", "f", "g", "o", "r", "z", "n")}
            dh = torch.zeros(B, T, P, dtype=torch.float64, requires_grad=perturb)
            dc = torch.zeros(B, T, H, dtype=torch.float64, requires_grad=perturb)
            ed = {k[2]: v for k, v in (edits or {}).items() if k[:2] == (layer, rev)}

            def put(k, v):
                return torch.where(ed[k][0], ed[k][1].double(), v) if k in ed else v

            for t in (range(T - 1, -1, -1) if rev else range(T)):
                xt = layer_in[:, t]
                if lstm:
                    a = xt @ w_ih.T + b_ih + h @ w_hh.T + b_hh
                    i, f, g, o = a.chunk(4, -1)
                    i, f, g, o = (put(k, v) for k, v in zip("ifgo", (torch.sigmoid(i), torch.sigmoid(f),
                                                                          torch.tanh(g), torch.sigmoid(o))))
                    c = put("c", f * c + i * g) + dc[:, t]
                    h = o * torch.tanh(c)
                    if w_hr is not None:
                        h = h @ w_hr.T
                    h = put("h", h) + dh[:, t]
                    for k, v in zip("cifgo", (c, i, f, g, o)):
                        rec[k][t] = v
                elif gru:
                    ax, ah = xt @ w_ih.T + b_ih, h @ w_hh.T + b_hh
                    r = put("r", torch.sigmoid(ax[:, :H] + ah[:, :H]))
                    z = put("z", torch.sigmoid(ax[:, H:2 * H] + ah[:, H:2 * H]))
                    n = put("n", torch.tanh(ax[:, 2 * H:] + r * ah[:, 2 * H:]))
                    h = put("h", (1 - z) * n + z * h) + dh[:, t]
                    for k, v in zip("rzn", (r, z, n)):
                        rec[k][t] = v
                else:
                    a = xt @ w_ih.T + b_ih + h @ w_hh.T + b_hh
                    h = put("h", torch.tanh(a) if m.nonlinearity == "tanh" else torch.relu(a)) + dh[:, t]
                rec["h"][t] = h
            for k, v in rec.items():
                if v[0] is not None:
                    states[(layer, rev, k)] = torch.stack(v, 1)
            deltas[(layer, rev, "h")] = dh
            if lstm:
                deltas[(layer, rev, "c")] = dc
            outs.append(states[(layer, rev, "h")])
        layer_in = torch.cat(outs, -1)
    out = layer_in if m.batch_first else layer_in.transpose(0, 1)
    return out, states, deltas
