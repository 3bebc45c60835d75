"""Hand-written cells declared with ``rs.cell`` in the tests: each with its forward, its gate
function (the user's, from the same inputs) and a textbook float64 version that
``steploops.RefDeclared`` runs as the reference, passing each state through ``nudge`` where it is made."""
from __future__ import annotations

import torch
from torch import nn


def ln_lstm_gates(m, x, state=None):
    """The LayerNorm LSTM's gates from the call's inputs, and the states they give."""
    h, c = state if state is not None else (x.new_zeros(x.shape[0], m.hidden_size),) * 2
    i, f, g, o = m.ln(m.ih(x) + m.hh(h)).chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return {"i": i, "f": f, "g": g, "o": o, "c": c, "h": o * torch.tanh(m.ln_c(c))}


class LayerNormLSTMCell(nn.Module):
    """Ba et al.'s LayerNorm LSTM: the gates' pre-activations and the cell normalised."""

    def __init__(self, I, H):
        super().__init__()
        self.hidden_size = H
        self.ih, self.hh = nn.Linear(I, 4 * H), nn.Linear(H, 4 * H, bias=False)
        self.ln, self.ln_c = nn.LayerNorm(4 * H), nn.LayerNorm(H)

    def forward(self, x, state=None):
        if state is None:
            state = (x.new_zeros(x.shape[0], self.hidden_size), x.new_zeros(x.shape[0], self.hidden_size))
        h, c = state
        a = self.ln(self.hh(h) + self.ih(x))
        H = self.hidden_size
        c = torch.sigmoid(a[:, H:2 * H]) * c + torch.sigmoid(a[:, :H]) * torch.tanh(a[:, 2 * H:3 * H])
        return torch.sigmoid(a[:, 3 * H:]) * torch.tanh(self.ln_c(c)), c


def mlstm_gates(m, x, state):
    h, c = state
    mm = m.wmx(x) * m.wmh(h)
    i, f, o, u = (m.wx(x) + m.wm(mm)).chunk(4, -1)
    i, f, o, u = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(u)
    c = f * c + i * u
    return {"m": mm, "i": i, "f": f, "o": o, "u": u, "c": c, "h": o * torch.tanh(c)}


class MultiplicativeLSTMCell(nn.Module):
    """Krause et al.'s mLSTM (the sentiment neuron's): an input-dependent transition ``m = (W x) * (U h)``."""

    def __init__(self, I, H):
        super().__init__()
        self.wmx, self.wmh = nn.Linear(I, H, bias=False), nn.Linear(H, H, bias=False)
        self.wx, self.wm = nn.Linear(I, 4 * H), nn.Linear(H, 4 * H, bias=False)

    def forward(self, x, state):
        h, c = state
        gates = self.wx(x) + self.wm(self.wmx(x) * self.wmh(h))
        i, f, o, u = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c


class IndRNNCell(nn.Module):
    """Li et al.'s IndRNN: each unit recurs on itself only, ``h = relu(W x + u * h + b)``."""

    def __init__(self, I, H):
        super().__init__()
        self.w, self.u = nn.Linear(I, H), nn.Parameter(torch.rand(H) * 0.9)

    def forward(self, x, h=None):
        return torch.relu(self.w(x) + (self.u * h if h is not None else 0))


def _zeros(x, H, state):
    return state if state is not None else (x.new_zeros(x.shape[0], H), x.new_zeros(x.shape[0], H))


def ln_lstm_textbook(m, x, state, nudge):
    h, c = _zeros(x, m.hidden_size, state)
    a = x @ m.ih.weight.T + m.ih.bias + h @ m.hh.weight.T
    a = (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + m.ln.eps)
    i, f, g, o = (a * m.ln.weight + m.ln.bias).chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = nudge("c", f * c + i * g)
    cn = (c - c.mean(-1, keepdim=True)) / torch.sqrt(c.var(-1, unbiased=False, keepdim=True) + m.ln_c.eps)
    return {"i": i, "f": f, "g": g, "o": o, "c": c, "h": nudge("h", o * torch.tanh(cn * m.ln_c.weight + m.ln_c.bias))}


def mlstm_textbook(m, x, state, nudge):
    h, c = state
    mm = (x @ m.wmx.weight.T) * (h @ m.wmh.weight.T)
    i, f, o, u = (x @ m.wx.weight.T + m.wx.bias + mm @ m.wm.weight.T).chunk(4, -1)
    i, f, o, u = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(u)
    c = nudge("c", f * c + i * u)
    return {"m": mm, "i": i, "f": f, "o": o, "u": u, "c": c, "h": nudge("h", o * torch.tanh(c))}


def indrnn_textbook(m, x, h, nudge):
    a = x @ m.w.weight.T + m.w.bias + (m.u * h if h is not None else 0)
    return {"h": nudge("h", torch.relu(a))}


class CellLoop(nn.Module):
    """A loop over any cell with an (h, c) or h state, a head on every step; ``zeros``: an explicit first state."""

    def __init__(self, cell, H, zeros=False):
        super().__init__()
        self.cell, self.head, self.zeros = cell, nn.Linear(H, 3), zeros

    def forward(self, xs):
        B, H = xs.shape[1], self.head.in_features
        st = (xs.new_zeros(B, H), xs.new_zeros(B, H)) if self.zeros else None
        outs = []
        for x in xs:
            st = self.cell(x, st)
            outs.append(self.head(st[0] if isinstance(st, tuple) else st))
        return torch.stack(outs)
