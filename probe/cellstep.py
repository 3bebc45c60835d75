"""One step of a cell, and the one ``forward`` that stands in for a cell's while rnnscope holds it.

``_lstm``, ``_gru`` and ``_rnn`` are the equations of the cells' own CPU kernels (ATen's
``LSTMCell``, ``GRUCell``, ``SimpleCell``) in their operation order and memory layouts, which decide
the last bit of a vectorised ``sigmoid``: h and c are the kernel's to the bit. Given
``put(kind, value)`` (an ``Intervention``'s edits, ``where(mask, value, state)``), each gate passes
through it right after its nonlinearity and each state as soon as it is computed, so what follows is
computed from the edited value, as in the fused modules' edited layers (``probe.families``):

    LSTM   i f g o;   c = f*c + i*g;   c <- put;   h = o*tanh(c);   h <- put
    GRU    r;   n = tanh(a_in + r*a_hn);   n, z <- put;   h = (h - n)*z + n;   h <- put
    RNN    h <- put

Without edits no ``put`` is passed and the operations are exactly the kernel's.

While a Probe or an Intervention holds a cell, its ``forward`` is one ``CellForward``: a Probe's
``CellTape`` (``probe.cells``) records each step, each Intervention adds its edits, and the last to
leave removes the instance attribute, leaving the module as it was. A declared cell's forward is the
user's code, so only the ``h`` it returns can be edited (the last thing it computes).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rnnscope.errors import RnnscopeError

from .engine import expand

F = nn.functional


@dataclass(frozen=True)
class CellSpec:
    """A module declared a recurrent cell: it returns its states in ``kinds`` order (one tensor
    for one kind, else a tuple), each ``[batch, units]`` (or ``[units]`` unbatched); its state
    comes in ``state`` (a position after the input, or a keyword), None on a first step. Its
    ``grad_c`` is the gradient of the ``c`` tensor it returns: the total dL/dc_t where its ``h`` is
    computed from that same tensor, as in any LSTM written the plain way;
    ``gates(module, *args, **kwargs) -> {kind: [batch, units]}`` gives its gates from the call's
    inputs, and the states they imply, which are checked against the module's own on the first call."""
    kinds: tuple[str, ...]
    gates: Callable | None = None
    state: int | str = 1


def cell(target=None, *, kinds=("h",), gates: Callable | None = None, state: int | str = 1):
    """Declare a module class (as a decorator) or one module instance a recurrent cell.

    Args:
        target: the ``nn.Module`` subclass or instance; omitted, ``cell(...)`` returns a decorator.
        kinds: the states its ``forward`` returns, in order: ``("h",)`` (one tensor) or ``("h", "c")``.
        gates: optional ``gates(module, *args, **kwargs) -> dict`` computing, from the same call's
            arguments, the gates to record and the states they give (``"h"``, ``"c"``), e.g. for a
            LayerNorm LSTM::

                def ln_gates(m, x, state=None):
                    h, c = state if state is not None else (x.new_zeros(len(x), m.hidden),) * 2
                    i, f, g, o = m.ln(m.ih(x) + m.hh(h)).chunk(4, -1)
                    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                    c = f * c + i * g
                    return {"i": i, "f": f, "g": g, "o": o, "c": c, "h": o * torch.tanh(m.ln_c(c))}

                @rs.cell(kinds=("h", "c"), gates=ln_gates)
                class LayerNormLSTMCell(nn.Module): ...
        state: where the state is passed: a position (1: ``forward(x, state)``) or a keyword.

    Returns:
        ``target`` (declared), or the decorator.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ("h", "c")] or ([] if kinds[:1] == ("h",) and len(set(kinds)) == len(kinds)
                                                         else ["order"])
    if bad:
        raise RnnscopeError(f"cell kinds {kinds} are not ('h',) or ('h', 'c')",
                            "declare the states the module returns: kinds=('h',) or kinds=('h', 'c')")
    spec = CellSpec(kinds, gates, state)

    def mark(t):
        setattr(t, "__rnnscope_cell__", spec)
        return t
    return mark if target is None else mark(target)


def _same(kind: str, v: torch.Tensor) -> torch.Tensor:
    """No edit: the tensor itself, so the operations are the kernel's."""
    return v


def _lstm(m, x, h, c, put=_same) -> dict:
    """ATen's LSTMCell, its very operations: ``gates = (W_hh h + b_hh).add_(W_ih x + b_ih)``,
    ``unsafe_chunk`` and each gate's nonlinearity in place (one allocation per step fewer for each,
    and views autograd does not track, as the kernel's)."""
    i, f, g, o = F.linear(h, m.weight_hh, m.bias_hh).add_(F.linear(x, m.weight_ih, m.bias_ih)).unsafe_chunk(4, 1)
    i, f, g, o = put("i", i.sigmoid_()), put("f", f.sigmoid_()), put("g", g.tanh_()), put("o", o.sigmoid_())
    c = put("c", (f * c).add_(i * g))
    return {"h": put("h", o * c.tanh()), "c": c, "i": i, "f": f, "g": g, "o": o}


def _gru(m, x, h, c, put=_same) -> dict:
    """ATen's GRUCell, ``h' = (h - n) z + n``. r and z are taken through views of one ``[B, 3H]``
    sum, as the kernel's in-place ``sigmoid_`` on its chunks is: a contiguous ``[B, H]`` would
    vectorise across rows and differ from the kernel in the last bit."""
    H = m.hidden_size
    ai, ah = F.linear(x, m.weight_ih, m.bias_ih), F.linear(h, m.weight_hh, m.bias_hh)
    s = ah + ai
    r, z = put("r", s[:, :H].sigmoid()), put("z", s[:, H:2 * H].sigmoid())
    n = put("n", (ai[:, 2 * H:] + ah[:, 2 * H:] * r).tanh())
    return {"h": put("h", (h - n) * z + n), "r": r, "z": z, "n": n}


def _rnn(m, x, h, c, put=_same) -> dict:
    a = F.linear(h, m.weight_hh, m.bias_hh) + F.linear(x, m.weight_ih, m.bias_ih)
    return {"h": put("h", a.tanh() if m.nonlinearity == "tanh" else a.relu())}


# class -> (state kinds, gate kinds, step); only the class's own forward is replaced
BUILTIN = {nn.LSTMCell: (("h", "c"), "ifgo", _lstm), nn.GRUCell: (("h",), "rzn", _gru), nn.RNNCell: (("h",), "", _rnn)}


def spec_of(m: nn.Module):
    """The module's ``CellSpec`` (declared), its ``BUILTIN`` entry, or None."""
    spec = getattr(m, "__rnnscope_cell__", None)
    if isinstance(spec, CellSpec):
        return spec
    return next((e for cls, e in BUILTIN.items() if isinstance(m, cls) and type(m).forward is cls.forward), None)


def _rows(v: torch.Tensor) -> torch.Tensor:
    """An unbatched step ``[units]`` as a batch of one."""
    return v.unsqueeze(0) if v.dim() == 1 else v


def _first_rows(a, B: int):
    """An edit's mask or value, its first ``B`` rows where it is ``[batch, units]``: a batch that
    shrinks by dropping its last rows keeps its first rows' edits. Numbers stay numbers (so a value
    is converted once, to the step's own dtype)."""
    a = a if isinstance(a, (torch.Tensor, np.ndarray, numbers.Number)) else np.asarray(a)
    return a[:B] if getattr(a, "ndim", 0) == 2 else a


def edits_at(edits: dict, B: int, U: int, like: torch.Tensor) -> Callable:
    """``put(kind, v)`` for one step of batch ``B``: ``where(mask, value, v)`` for an edited kind,
    ``v`` itself otherwise. ``edits``: ``{kind: (mask, value)}``, each ``[units]`` or ``[batch, units]``."""
    now = {k: expand(_first_rows(mask, B), _first_rows(value, B), B, U, like) for k, (mask, value) in edits.items()}

    def put(kind: str, v: torch.Tensor) -> torch.Tensor:
        if kind not in now:
            return v
        mask, value = now[kind]
        return torch.where(mask, value, v)
    return put


class CellForward:
    """The instance-level ``forward`` of one cell while rnnscope holds it: ``tape`` (a Probe's
    ``CellTape``, or None) records each step; ``editors`` (``[(intervention, {kind: (mask, value)})]``,
    later ones winning on a shared kind) edit it."""

    def __init__(self, name: str, m: nn.Module):
        self.name, self.m, self.spec = name, m, spec_of(m)
        self.tape = None
        self.editors: list[tuple] = []
        self.checked: set = set()

    def __repr__(self) -> str:
        return (f"CellForward({self.name or '<model>'}: tape {'on' if self.tape else 'off'}, "
                f"{len(self.editors)} editor(s))")

    def forward(self, *args, **kwargs):
        edits = {k: v for _, ed in self.editors for k, v in ed.items()}
        if isinstance(self.spec, CellSpec):
            return self._declared(edits, *args, **kwargs)
        return self._builtin(edits, *args, **kwargs)

    def _builtin(self, edits: dict, input, hx=None):
        m, (states, gates, step) = self.m, self.spec
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(m).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h = c = x.new_zeros(x.shape[0], m.hidden_size)
        else:
            h, c = hx if len(states) == 2 else (hx, None)
            if not batched:
                h, c = h.unsqueeze(0), (c.unsqueeze(0) if c is not None else None)
        if h.shape != (x.shape[0], m.hidden_size) or (c is not None and c.shape != h.shape):
            # the kernel refuses these; broadcasting in the equations would not
            raise RuntimeError(f"{type(m).__name__}: state of shape {tuple(h.shape)} for an input of batch "
                               f"{x.shape[0]} and {m.hidden_size} units")
        x = self.tape.leaf(x, hx) if self.tape is not None else x
        if edits:
            out = step(m, x, h, c, edits_at(edits, x.shape[0], m.hidden_size, x))
            self._check(input, hx, x.shape[0], lambda: step(m, x, h, c))
        else:
            out = step(m, x, h, c)
            self._check(input, hx, x.shape[0], lambda: out)
        if self.tape is not None:
            self.tape.keep_step(x.shape[0], hx, out, states, gates)
        res = tuple(out[k] if batched else out[k].squeeze(0) for k in states)
        return res if len(res) == 2 else res[0]

    def _check(self, input, hx, B: int, unedited: Callable) -> None:
        """The first call of each batch size, dtype and device: the equations without edits (``unedited()``)
        against the cell's own kernel on the same inputs."""
        sig = (B, input.dtype, input.device)
        if sig in self.checked:
            return
        with torch.no_grad():
            ref = type(self.m).forward(self.m, input, hx)
            out = unedited()
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = [out[k] if input.dim() == 2 else out[k].squeeze(0) for k in self.spec[0]]
        same = all(torch.equal(a, b) if input.device.type == "cpu" else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                   for a, b in zip(got, ref))
        if not same:
            diff = max(float((a.detach() - b).abs().max()) for a, b in zip(got, ref))
            raise RnnscopeError(f"cell {self.name or '<model>'}: rnnscope's {type(self.m).__name__} equations do not "
                                f"reproduce the kernel's outputs on {input.device.type} (off by {diff:.3g})",
                                f"report it with torch {torch.__version__}; probe the model without this cell meanwhile")
        self.checked.add(sig)

    def _declared(self, edits: dict, *args, **kwargs):
        """A declared cell: its own forward, then its ``h`` edited (the only edit an Intervention takes
        there), then the tape's record of both."""
        m, spec, tape = self.m, self.spec, self.tape
        if tape is not None and args:
            args = (tape.leaf(args[0], declared_state(spec, args, kwargs)), *args[1:])
        own = dict(zip(spec.kinds, _split(type(m).forward(m, *args, **kwargs), spec.kinds, self.name)))
        outs = own
        if edits:
            h = _rows(own["h"])
            h = edits_at(edits, h.shape[0], h.shape[-1], h)("h", h)
            outs = {**own, "h": h if own["h"].dim() == 2 else h.squeeze(0)}
        if tape is not None:
            tape.keep_declared(args, kwargs, own, outs)
        return outs["h"] if len(spec.kinds) == 1 else tuple(outs[k] for k in spec.kinds)


def declared_state(spec: CellSpec, args: tuple, kwargs: dict):
    """The state a declared cell's call passes (None on a first step)."""
    at = spec.state
    return (args[at] if len(args) > at else None) if isinstance(at, int) else kwargs.get(at)


def _split(res, kinds: tuple, name: str) -> list:
    """The declared states out of what the forward returned, or one line saying they are not there."""
    parts = [res] if len(kinds) == 1 else list(res) if isinstance(res, (tuple, list)) else None
    ok = parts is not None and len(parts) == len(kinds) and all(isinstance(p, torch.Tensor) and p.dim() in (1, 2)
                                                                 for p in parts)
    if not ok:
        got = (f"a tuple of {len(res)}" if isinstance(res, (tuple, list)) else
               f"a {res.dim()}-d tensor" if isinstance(res, torch.Tensor) else type(res).__name__)
        raise RnnscopeError(f"cell {name or '<model>'} is declared with kinds {kinds} but its forward returned {got}",
                            "declare kinds=('h',) for a cell returning h [batch, units], ('h', 'c') for one returning "
                            "(h, c)")
    return parts


def forward_of(m: nn.Module) -> CellForward | None:
    owner = getattr(m.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, CellForward) else None


def refuse_foreign(cells: dict[str, nn.Module]) -> None:
    """Refuse, touching nothing, a cell whose forward someone else replaced."""
    taken = [n for n, m in cells.items() if "forward" in m.__dict__ and forward_of(m) is None]
    if taken:
        raise RnnscopeError(f"module {taken[0] or '<model>'} already has an instance-level forward that is not "
                            "rnnscope's", "remove it (del module.forward) before probing or editing")


def hold(name: str, m: nn.Module) -> CellForward:
    """The cell's ``CellForward``, installed as its forward where there is none yet."""
    fw = forward_of(m)
    if fw is None:
        fw = CellForward(name, m)
        m.forward = fw.forward
    return fw


def release(m: nn.Module) -> None:
    """The cell's own forward again once nothing holds it: the instance attribute removed."""
    fw = forward_of(m)
    if fw is not None and fw.tape is None and not fw.editors:
        del m.__dict__["forward"]


def join_edits(cells: dict[str, nn.Module], client, edits: dict) -> None:
    """Register ``client``'s ``edits[name]`` (``{kind: (mask, value)}``) with each of ``cells``."""
    refuse_foreign(cells)
    for name, m in cells.items():
        hold(name, m).editors.append((client, edits[name]))


def leave_edits(cells: dict[str, nn.Module], client) -> None:
    for m in cells.values():
        fw = forward_of(m)
        if fw is not None:
            fw.editors = [e for e in fw.editors if e[0] is not client]
            release(m)
