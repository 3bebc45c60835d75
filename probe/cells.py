"""Step loops: ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell`` and cells declared with ``cell``.

A cell has one step per call, in call order. Its keys are those of a one-layer module,
``{module}.l0.{kind}`` (``decoder.cell.l0.c``; a model that is itself a cell reads ``l0.h``), with
the kinds of its family (LSTM ``h c i f g o``, GRU ``h r z n``, RNN ``h``; gradients ``grad_h``,
``grad_c``) or, for a declared cell, its state kinds and the gates its gate function returns.
These keys are stable.

Inside a ``Probe`` block each built-in cell's ``forward`` is ``CellTape.forward``: one step from
the equations of the cell's own CPU kernel (ATen's ``LSTMCell``/``GRUCell``/``SimpleCell``, in
their operation order and memory layouts, which decide the last bit of a vectorised ``sigmoid``),
so the gates come out of the work the step does anyway and h and c are the kernel's to the bit.
That is checked against the kernel itself on the first call of each batch size, dtype and device;
elsewhere than the CPU the device's fused kernel rounds differently, and the check is to 1e-5.

Consecutive calls form one sequence while the batch stays or shrinks by dropping its last rows
(captions sorted longest first: ``h[:b_t]``); the rows gone read NaN. A call without state, or a
changed batch whose state is all zeros, starts a new sequence (``probe.cell_calls`` holds each);
a batch that grows with a carried state is refused. With ``grad=True`` a tensor hook on each
step's h and c receives the total dL/dh_t and dL/dc_t: through the loop, whatever the caller
does to the state between calls, and the layers above; nothing past a ``detach``. A Probe's
``carry`` does not touch a cell: its loop passes the state itself.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from rnnscope.errors import RnnscopeError, call_user

from .keys import state_key

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


def _lstm(m, x, h, c) -> dict:
    """ATen's LSTMCell: ``gates = W_hh h + b_hh + (W_ih x + b_ih)``, chunked in place."""
    i, f, g, o = (F.linear(h, m.weight_hh, m.bias_hh) + F.linear(x, m.weight_ih, m.bias_ih)).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * c + i * g
    return {"h": o * c.tanh(), "c": c, "i": i, "f": f, "g": g, "o": o}


def _gru(m, x, h, c) -> dict:
    """ATen's GRUCell, ``h' = (h - n) z + n``. r and z are taken through views of one ``[B, 3H]``
    sum, as the kernel's in-place ``sigmoid_`` on its chunks is: a contiguous ``[B, H]`` would
    vectorise across rows and differ from the kernel in the last bit."""
    H = m.hidden_size
    ai, ah = F.linear(x, m.weight_ih, m.bias_ih), F.linear(h, m.weight_hh, m.bias_hh)
    s = ah + ai
    r, z = s[:, :H].sigmoid(), s[:, H:2 * H].sigmoid()
    n = (ai[:, 2 * H:] + ah[:, 2 * H:] * r).tanh()
    return {"h": (h - n) * z + n, "r": r, "z": z, "n": n}


def _rnn(m, x, h, c) -> dict:
    a = F.linear(h, m.weight_hh, m.bias_hh) + F.linear(x, m.weight_ih, m.bias_ih)
    return {"h": a.tanh() if m.nonlinearity == "tanh" else a.relu()}


# class -> (state kinds, gate kinds, step); only the class's own forward is replaced
BUILTIN = {nn.LSTMCell: (("h", "c"), "ifgo", _lstm), nn.GRUCell: (("h",), "rzn", _gru), nn.RNNCell: (("h",), "", _rnn)}


def spec_of(m: nn.Module):
    """The module's ``CellSpec`` (declared), its ``BUILTIN`` entry, or None."""
    spec = getattr(m, "__rnnscope_cell__", None)
    if isinstance(spec, CellSpec):
        return spec
    return next((e for cls, e in BUILTIN.items() if isinstance(m, cls) and type(m).forward is cls.forward), None)


def cell_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every recurrent cell inside ``model`` (the model itself is named ''). A
    TorchScript cell is refused: its compiled caller never looks up a forward rnnscope could replace."""
    scripted = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)
                and getattr(m, "original_name", "") in {c.__name__ for c in BUILTIN}]
    if scripted:
        raise RnnscopeError(f"cell {scripted[0] or '<model>'} is TorchScript: its compiled loop calls the cell's "
                            "kernel directly, where no probe can see its steps",
                            "probe the eager model (the module before torch.jit.script), built from the same code")
    return {name: m for name, m in model.named_modules() if spec_of(m) is not None}


class CellCall(Mapping):
    """One sequence of one cell: ``call[key] -> [batch, time, units]``, the batch of its first step,
    NaN where a row had left the batch."""

    def __init__(self, name: str, kinds: list[str], rows: int):
        self.rows, self.batch = rows, rows
        self._kinds = {state_key(name, 0, False, k): k for k in kinds}
        self.steps: dict[str, list] = {k: [] for k in kinds if not k.startswith("grad_")}
        self.grads: dict[str, list] = {k: [] for k in kinds if k.startswith("grad_")}

    def swap_grads(self, grads: dict | None = None) -> dict:
        """The gradients recorded so far, replaced by ``grads`` (none yet, without): a backward that
        ``Probe.gradients_apart`` runs is kept apart from the ordinary one's."""
        old = self.grads
        self.grads = grads if grads is not None else {k: [None] * len(v) for k, v in old.items()}
        return old

    def add_grad(self, kind: str, t: int, g: torch.Tensor) -> None:
        """A hook's dL/d(state) at step t; a second backward accumulates, as ``.grad`` does."""
        old, g = self.grads[kind][t], _rows(g.detach())
        self.grads[kind][t] = g if old is None else old + g

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._kinds:
            raise KeyError(f"{key!r} was not recorded; recorded keys: {', '.join(self._kinds)}")
        kind = self._kinds[key]
        if kind in self.grads:
            gs = self.grads[kind]
            if all(g is None for g in gs):
                raise RnnscopeError("no gradient has reached the probed cell yet",
                                    "call loss.backward() on a loss computed inside the Probe(grad=True) block")
            like = self.steps[kind[5:]]
            return _stack([torch.zeros_like(v) if g is None else g for g, v in zip(gs, like)], self.batch)
        return _stack(self.steps[kind], self.batch)

    def __iter__(self):
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return (f"CellCall of {len(self.steps['h'])} step(s), batch {self.batch}: "
                f"{', '.join(self._kinds)}")


def _stack(vs: list, B: int) -> torch.Tensor:
    """``T`` steps ``[b_t, units]`` with ``b_t <= B`` -> ``[B, T, units]``, NaN below each ``b_t``."""
    if all(v.shape[0] == B for v in vs):
        return torch.stack(vs, 1)
    out = vs[0].new_full((B, len(vs), vs[0].shape[-1]), float("nan"))
    for t, v in enumerate(vs):
        out[:v.shape[0], t] = v
    return out


def _rows(v: torch.Tensor) -> torch.Tensor:
    """An unbatched step ``[units]`` as a batch of one."""
    return v.unsqueeze(0) if v.dim() == 1 else v


def _fresh(state) -> bool:
    """A state that starts a sequence: none, or all zeros with no history."""
    parts = [] if state is None else list(state) if isinstance(state, (tuple, list)) else [state]
    return all(isinstance(s, torch.Tensor) and s.grad_fn is None and not s.count_nonzero() for s in parts)


class CellTape:
    """What one Probe records of one cell; its ``forward`` stands in for the cell's inside the block."""

    def __init__(self, probe, name: str, m: nn.Module):
        self.probe, self.name, self.m = probe, name, m
        self.spec = spec_of(m)
        self.current: CellCall | None = None
        self.checked: set = set()

    def _kinds(self, states, gates) -> list[str]:
        want = self.probe.kinds
        kept = [k for k in (*states, *gates) if want is None or k in want]
        return kept + ([f"grad_{k}" for k in states] if self.probe.grad else [])

    def _sequence(self, B: int, state, states, gates) -> CellCall:
        """The sequence this step belongs to: the current one, or a new one (see the module docstring)."""
        cur = self.current
        if cur is None or state is None or (B != cur.rows and _fresh(state)):
            cur = self.current = CellCall(self.name, self._kinds(states, gates), B)
            self.probe.cell_calls.append(cur)
        elif B > cur.rows:
            raise RnnscopeError(f"cell {self.name or '<model>'}: a step has batch {B} after one with batch {cur.rows}, "
                                "with the state carried on",
                                "a batch may only shrink by dropping its last rows (longest sequences first); "
                                "start a new sequence with no state or zeros")
        cur.rows = B
        return cur

    def _keep(self, seq: CellCall, out: dict, states) -> None:
        """``out``: kind -> this step's tensor, ``[B, units]`` or unbatched; the states' are the ones
        the caller receives (or their base), so their hooks see every use."""
        t = len(seq.steps["h"])
        for k, lst in seq.steps.items():
            v = out[k]
            lst.append(_rows(v.detach() if v.requires_grad else v))
        for k in states:
            if f"grad_{k}" in seq.grads:
                seq.grads[f"grad_{k}"].append(None)
                v = out[k]
                if v.requires_grad:
                    v.register_hook(partial(seq.add_grad, f"grad_{k}", t))

    def _leaf(self, x):
        """With frozen weights and an input that needs no gradient, a leaf, so hooks see dL/dh."""
        if self.probe.grad and torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad \
                and x.is_floating_point():
            return x.detach().requires_grad_()
        return x

    def forward(self, *args, **kwargs):
        if isinstance(self.spec, CellSpec):
            return self._declared(*args, **kwargs)
        return self._builtin(*args, **kwargs)

    def _builtin(self, input, hx=None):
        m, (states, gates, step) = self.m, self.spec
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(m).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = self._leaf(input if batched else input.unsqueeze(0))
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
        out = step(m, x, h, c)
        self._check(input, hx, out, x.shape[0])
        self._keep(self._sequence(x.shape[0], hx, states, gates), out, states)
        res = tuple(out[k] if batched else out[k].squeeze(0) for k in states)
        return res if len(res) == 2 else res[0]

    def _check(self, input, hx, out, B: int) -> None:
        """The first call of each batch size, dtype and device: the cell's own kernel on the same inputs."""
        sig = (B, input.dtype, input.device)
        if sig in self.checked:
            return
        with torch.no_grad():
            ref = type(self.m).forward(self.m, input, hx)
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

    def _declared(self, *args, **kwargs):
        """A declared cell: its own forward, then (no graph) its gate function; both checked on the first call."""
        m, spec = self.m, self.spec
        args = (self._leaf(args[0]), *args[1:]) if args else args
        at = spec.state
        state = (args[at] if len(args) > at else None) if isinstance(at, int) else kwargs.get(at)
        outs = dict(zip(spec.kinds, _split(type(m).forward(m, *args, **kwargs), spec.kinds, self.name)))
        gates = {}
        if spec.gates is not None:
            with torch.no_grad():
                gates = call_user(spec.gates, m, *args, doing=f"the gate function of cell {self.name or '<model>'}",
                                  fix="fix the gate function given to rnnscope.cell", **kwargs)
            if "declared" not in self.checked:
                _check_gates(self.name, gates, outs)
                self.checked.add("declared")
            gates = {k: v for k, v in gates.items() if k not in spec.kinds}
        B = _rows(outs["h"]).shape[0]
        self._keep(self._sequence(B, state, spec.kinds, tuple(gates)), {**outs, **gates}, spec.kinds)
        return outs["h"] if len(spec.kinds) == 1 else tuple(outs[k] for k in spec.kinds)


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


def _check_gates(name: str, gates, outs: dict) -> None:
    """The gate function's states against the module's own outputs (1e-5: it may add in another order)."""
    where = f"the gate function of cell {name or '<model>'}"
    if not isinstance(gates, dict) or not all(isinstance(k, str) and k.isidentifier() and not k.startswith("grad_")
                                              and isinstance(v, torch.Tensor) for k, v in gates.items()):
        raise RnnscopeError(f"{where} did not return a dict of kind names to tensors",
                            "return {'i': i, ..., 'h': h} with plain names")
    for k, v in outs.items():
        g = gates.get(k)
        if g is None or g.shape != v.shape or not torch.allclose(g, v.detach(), rtol=1e-5, atol=1e-6):
            raise RnnscopeError(f"{where} does not reproduce the cell's own {k!r}" + ("" if g is None else
                                f" (off by {float((g - v.detach()).abs().max()) if g.shape == v.shape else 'shape'})"),
                                f"return the gates and the states they give ({', '.join(outs)}) from the same inputs")


def known_kinds(m: nn.Module) -> tuple[str, ...] | None:
    """The kinds a cell records, or None where a gate function decides them on its first call."""
    spec = spec_of(m)
    if isinstance(spec, CellSpec):
        return spec.kinds if spec.gates is None else None
    return (*spec[0], *spec[1])


def identity(m: nn.Module) -> dict:
    """A cell as a Run's manifest names a recurrent module: one layer, one direction."""
    return {"type": type(m).__name__ if not isinstance(spec_of(m), CellSpec) else "cell", "layers": 1,
            "hidden": getattr(m, "hidden_size", None), "bidirectional": False, "proj_size": 0}


def restart(tapes: list[CellTape]) -> None:
    """Every cell's next call starts a new sequence (what was recorded has been written away)."""
    for t in tapes:
        t.current = None


def check(cells: dict[str, nn.Module]) -> None:
    """Refuse, touching nothing, a cell whose forward someone else replaced (or another Probe records)."""
    taken = [n for n, m in cells.items() if "forward" in m.__dict__]
    if taken:
        owner = getattr(cells[taken[0]].__dict__["forward"], "__self__", None)
        if isinstance(owner, CellTape):
            raise RnnscopeError(f"cell {taken[0] or '<model>'} is already recorded by another Probe",
                                "exit the other Probe first, or read what it records")
        raise RnnscopeError(f"module {taken[0] or '<model>'} already has an instance-level forward that is not "
                            "rnnscope's", "remove it (del module.forward) before probing")


def join(cells: dict[str, nn.Module], probe) -> list[CellTape]:
    tapes = [CellTape(probe, name, m) for name, m in cells.items()]
    for t in tapes:
        t.m.forward = t.forward
    return tapes


def leave(tapes: list[CellTape]) -> None:
    """Each cell's own forward again: the instance attribute removed, the module as it was."""
    for t in tapes:
        if getattr(t.m.__dict__.get("forward"), "__self__", None) is t:
            del t.m.__dict__["forward"]
