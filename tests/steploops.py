"""Step-loop models of the shapes people train, and their float64 reference.

The reference runs the same loop on a float64 copy of the model whose PyTorch cells (and fused
modules) are replaced by ``Ref*`` modules written from the textbook equations, not from
rnnscope's code; each adds a zero perturbation to every h_t and c_t, so after ``backward`` its
``.grad`` is the total derivative of the loss with respect to that state. Dropout masks drawn in
the float32 run are replayed in the reference (float32 and float64 dropout draw different masks).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

F = nn.functional


class _Ref(nn.Module):
    """A recorded step: ``steps`` holds one dict per call, kind -> ``[b_t, units]`` (float64)."""

    def __init__(self, m):
        super().__init__()
        self.m, self.steps = m, []
        self.hidden_size = getattr(m, "hidden_size", None)     # the loop reads it to build its states

    def _nudge(self, step: dict, kinds) -> dict:
        for k in kinds:
            d = torch.zeros_like(step[k], requires_grad=True)
            step[f"delta_{k}"] = d
            step[k] = step[k] + d
        return step


class RefCell(_Ref):
    """``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` from the textbook, float64."""

    def forward(self, x, hx=None):
        m, batched = self.m, x.dim() == 2
        x = x if batched else x.unsqueeze(0)
        H, lstm = m.hidden_size, isinstance(m, nn.LSTMCell)
        zeros = torch.zeros(x.shape[0], H, dtype=torch.float64)
        h, c = (hx if lstm else (hx, None)) if hx is not None else (zeros, zeros)
        if not batched and hx is not None:
            h, c = h.unsqueeze(0), (c.unsqueeze(0) if c is not None else None)
        b_ih = m.bias_ih if m.bias_ih is not None else 0
        b_hh = m.bias_hh if m.bias_hh is not None else 0
        ax, ah = x @ m.weight_ih.T + b_ih, h @ m.weight_hh.T + b_hh
        if lstm:
            i, f, g, o = (ax + ah).chunk(4, -1)
            st = {"i": torch.sigmoid(i), "f": torch.sigmoid(f), "g": torch.tanh(g), "o": torch.sigmoid(o)}
            st["c"] = st["f"] * c + st["i"] * st["g"]
            st = self._nudge(st, "c")
            st["h"] = st["o"] * torch.tanh(st["c"])
            st = self._nudge(st, "h")
        elif isinstance(m, nn.GRUCell):
            r = torch.sigmoid(ax[:, :H] + ah[:, :H])
            z = torch.sigmoid(ax[:, H:2 * H] + ah[:, H:2 * H])
            n = torch.tanh(ax[:, 2 * H:] + r * ah[:, 2 * H:])
            st = self._nudge({"r": r, "z": z, "n": n, "h": (1 - z) * n + z * h}, "h")
        else:
            st = self._nudge({"h": torch.tanh(ax + ah) if m.nonlinearity == "tanh" else torch.relu(ax + ah)}, "h")
        self.steps.append(st)
        out = (st["h"], st["c"]) if lstm else (st["h"],)
        out = out if batched else tuple(v.squeeze(0) for v in out)
        return out if lstm else out[0]


class RefGRU(_Ref):
    """A one-layer ``nn.GRU`` unrolled; each time step of each call is one recorded step."""

    def forward(self, x, h0=None):
        m = self.m
        x = x if m.batch_first else x.transpose(0, 1)
        cell = nn.GRUCell(m.input_size, m.hidden_size).double()
        for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                     ("bias_hh", "bias_hh_l0")):
            setattr(cell, a, getattr(m, b))
        step = RefCell(cell)
        h, outs = (h0[0] if h0 is not None else None), []
        for t in range(x.shape[1]):
            h = step(x[:, t], h)
            outs.append(h)
        self.steps += step.steps
        out = torch.stack(outs, 1)
        return (out if m.batch_first else out.transpose(0, 1)), h.unsqueeze(0)


class RefDeclared(_Ref):
    """A declared cell in float64 from ``equations(m, x, state, nudge) -> {kind: [B, units]}``, the
    test's own textbook version of it, which passes each state through ``nudge`` where it is made
    (c before h is computed from it, so its perturbation's gradient is the total dL/dc_t)."""

    def __init__(self, m, kinds, equations):
        super().__init__(m)
        self.kinds, self.equations = kinds, equations

    def forward(self, x, state=None):
        st = {}

        def nudge(kind, v):
            st[f"delta_{kind}"] = d = torch.zeros_like(v, requires_grad=True)
            return v + d
        st.update(self.equations(self.m, x, state, nudge))
        self.steps.append(st)
        res = tuple(st[k] for k in self.kinds)
        return res if len(res) > 1 else res[0]


class Dropouts:
    """``with Dropouts(model) as masks``: every ``nn.Dropout`` call's keep mask, in call order;
    ``replay(model64)`` makes the float64 copy's dropouts apply the same masks in the same order."""

    def __init__(self, model):
        self.model, self.masks, self.hooks = model, [], []

    def __enter__(self):
        for d in self.model.modules():
            if isinstance(d, nn.Dropout):
                self.hooks.append(d.register_forward_hook(lambda mod, a, out: self.masks.append(out.detach() != 0)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def replay(self, model64) -> None:
        masks = iter(list(self.masks))
        for d in model64.modules():
            if isinstance(d, nn.Dropout):
                p = d.p
                d.forward = lambda x, p=p, d=d: x * next(masks).to(x.dtype) / (1 - p) if d.training else x


def reference(model: nn.Module, replace=None) -> tuple[nn.Module, dict]:
    """A float64 copy of ``model`` whose cells and fused GRUs are ``Ref*`` modules: ``(copy, {name: ref})``.
    ``replace``: ``{name: factory(module64) -> _Ref}`` for declared cells."""
    m64 = copy.deepcopy(model).double()
    refs = {}
    for name, mod in list(m64.named_modules()):
        make = (replace or {}).get(name)
        if make is None and isinstance(mod, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
            make = RefCell
        if make is None and isinstance(mod, nn.GRU):
            make = RefGRU
        if make is None:
            continue
        refs[name] = make(mod)
        if not name:                        # the model is itself the cell
            return refs[name], refs
        parent, _, leaf = name.rpartition(".")
        setattr(m64.get_submodule(parent) if parent else m64, leaf, refs[name])
    return m64, refs


# ----------------------------------------------------------------------------------------------- the models

class Captioner(nn.Module):
    """Show, Attend and Tell: soft attention over a feature grid, an LSTMCell per word, the batch
    shrinking as captions end (``[:bt]``), teacher forcing."""

    def __init__(self, V=11, E=6, A=5, H=8):
        super().__init__()
        self.embed, self.init_h, self.init_c = nn.Embedding(V, E), nn.Linear(E, H), nn.Linear(E, H)
        self.enc_att, self.dec_att, self.full_att = nn.Linear(E, A), nn.Linear(H, A), nn.Linear(A, 1)
        self.f_beta, self.cell = nn.Linear(H, E), nn.LSTMCell(2 * E, H)
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(H, V)

    def forward(self, feats, caps, lengths):
        """``feats [B, P, E]``, ``caps [B, L]``, ``lengths`` sorted longest first. Returns ``[B, L-1, V]``."""
        mean = feats.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        emb = self.embed(caps)
        dec = [n - 1 for n in lengths]
        preds = feats.new_zeros(len(lengths), max(dec), self.fc.out_features)
        for t in range(max(dec)):
            bt = sum(n > t for n in dec)
            att = self.full_att(torch.relu(self.enc_att(feats[:bt]) + self.dec_att(h[:bt]).unsqueeze(1))).squeeze(2)
            alpha = att.softmax(1)
            awe = torch.sigmoid(self.f_beta(h[:bt])) * (feats[:bt] * alpha.unsqueeze(2)).sum(1)
            h, c = self.cell(torch.cat([emb[:bt, t], awe], 1), (h[:bt], c[:bt]))
            preds[:bt, t] = self.fc(self.drop(h))
        return preds


class StackedLSTM(nn.Module):
    """OpenNMT's: a list of LSTMCells, dropout between layers, states stacked ``[L, B, H]``."""

    def __init__(self, layers, inp, H, dropout):
        super().__init__()
        self.drop, self.layers = nn.Dropout(dropout), nn.ModuleList(
            nn.LSTMCell(inp if i == 0 else H, H) for i in range(layers))

    def forward(self, feed, hidden):
        h_0, c_0 = hidden
        h_1, c_1 = [], []
        for i, layer in enumerate(self.layers):
            h, c = layer(feed, (h_0[i], c_0[i]))
            feed = h if i + 1 == len(self.layers) else self.drop(h)
            h_1.append(h)
            c_1.append(c)
        return feed, (torch.stack(h_1), torch.stack(c_1))


class InputFeedDecoder(nn.Module):
    """OpenNMT's input-feeding decoder: the previous attentional output joins each step's input."""

    def __init__(self, V=9, E=5, H=7):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(V, E), StackedLSTM(2, E + H, H, 0.25)
        self.attn_out, self.head = nn.Linear(2 * H, H), nn.Linear(H, V)

    def forward(self, memory, tgt):
        """``memory [B, S, H]``, ``tgt [B, T]`` -> logits ``[B, T, V]``."""
        B, H = tgt.shape[0], self.head.in_features
        hidden = (memory.new_zeros(2, B, H), memory.new_zeros(2, B, H))
        feed, outs = memory.new_zeros(B, H), []
        for t in range(tgt.shape[1]):
            out, hidden = self.rnn(torch.cat([self.embed(tgt[:, t]), feed], 1), hidden)
            a = torch.einsum("bsh,bh->bs", memory, out).softmax(1)
            feed = torch.tanh(self.attn_out(torch.cat([torch.einsum("bs,bsh->bh", a, memory), out], 1)))
            outs.append(self.head(feed))
        return torch.stack(outs, 1)


class AttnDecoderRNN(nn.Module):
    """The PyTorch translation tutorial's: Bahdanau attention, then an ``nn.GRU`` called with one step."""

    def __init__(self, V=10, H=6):
        super().__init__()
        self.embed, self.encoder = nn.Embedding(V, H), nn.GRU(H, H, batch_first=True)
        self.Wa, self.Ua, self.Va = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, 1)
        self.gru, self.out = nn.GRU(2 * H, H, batch_first=True), nn.Linear(H, V)

    def forward(self, src, tgt):
        enc, hidden = self.encoder(self.embed(src))
        outs = []
        for t in range(tgt.shape[1]):
            emb = self.embed(tgt[:, t:t + 1])                                      # teacher forcing
            scores = self.Va(torch.tanh(self.Wa(hidden.permute(1, 0, 2)) + self.Ua(enc))).squeeze(2).unsqueeze(1)
            ctx = torch.bmm(scores.softmax(-1), enc)
            o, hidden = self.gru(torch.cat([emb, ctx], 2), hidden)
            outs.append(self.out(o))
        return torch.cat(outs, 1)


class RLCore(nn.Module):
    """A recurrent agent: an LSTMCell core, the state zeroed by the done mask between steps."""

    def __init__(self, O=4, H=6, A=3):
        super().__init__()
        self.enc, self.core, self.pi = nn.Linear(O, H), nn.LSTMCell(H, H), nn.Linear(H, A)

    def forward(self, obs, done):
        """``obs [T, B, O]``, ``done [T, B]`` (1 where an episode ended before step t)."""
        h = c = obs.new_zeros(obs.shape[1], self.core.hidden_size)
        outs = []
        for t in range(obs.shape[0]):
            keep = (1 - done[t]).unsqueeze(1)
            h, c = self.core(torch.relu(self.enc(obs[t])), (h * keep, c * keep))
            outs.append(self.pi(h))
        return torch.stack(outs)


class TacotronStep(nn.Module):
    """Tacotron 2's decoder step: an attention LSTMCell and a decoder LSTMCell, dropout on both states."""

    def __init__(self, M=4, E=5, A=6, D=7):
        super().__init__()
        self.prenet, self.att_rnn, self.dec_rnn = nn.Linear(M, 4), nn.LSTMCell(4 + E, A), nn.LSTMCell(A + E, D)
        self.query, self.drop_a, self.drop_d = nn.Linear(A, E), nn.Dropout(0.1), nn.Dropout(0.1)
        self.proj = nn.Linear(D + E, M)

    def forward(self, memory, frames):
        """``memory [B, S, E]``, ``frames [B, T, M]`` (teacher forcing) -> ``[B, T, M]``."""
        B, E = memory.shape[0], memory.shape[2]
        ah, ac = memory.new_zeros(B, self.att_rnn.hidden_size), memory.new_zeros(B, self.att_rnn.hidden_size)
        dh, dc = memory.new_zeros(B, self.dec_rnn.hidden_size), memory.new_zeros(B, self.dec_rnn.hidden_size)
        ctx, prev, outs = memory.new_zeros(B, E), memory.new_zeros(B, frames.shape[2]), []
        for t in range(frames.shape[1]):
            ah, ac = self.att_rnn(torch.cat([torch.relu(self.prenet(prev)), ctx], 1), (ah, ac))
            ah = self.drop_a(ah)
            w = torch.einsum("bse,be->bs", memory, self.query(ah)).softmax(1)
            ctx = torch.einsum("bs,bse->be", w, memory)
            dh, dc = self.dec_rnn(torch.cat([ah, ctx], 1), (dh, dc))
            dh = self.drop_d(dh)
            outs.append(self.proj(torch.cat([dh, ctx], 1)))
            prev = frames[:, t]
        return torch.stack(outs, 1)


class TwoLSTMCells(nn.Module):
    """A time-series model: two stacked LSTMCells (often float64), no state on the first call."""

    def __init__(self, H=6):
        super().__init__()
        self.l1, self.l2, self.out = nn.LSTMCell(1, H), nn.LSTMCell(H, H), nn.Linear(H, 1)

    def forward(self, x):
        s1 = s2 = None
        outs = []
        for t in range(x.shape[1]):
            s1 = self.l1(x[:, t], s1)
            s2 = self.l2(s1[0], s2)
            outs.append(self.out(s2[0]))
        return torch.stack(outs, 1)


class FrameModel(nn.Module):
    """An audio-style model the caller calls once per frame, carrying its state; LayerNorm on the
    state between calls."""

    def __init__(self, I=5, H=6):
        super().__init__()
        self.cell, self.norm, self.head = nn.LSTMCell(I, H), nn.LayerNorm(H), nn.Linear(H, 2)

    def forward(self, frame, state=None):
        h, c = self.cell(frame, state)
        return self.head(h), (self.norm(h), c)

