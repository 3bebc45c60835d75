"""Step loops: ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell`` and cells declared with ``cell``.

A cell has one step per call, in call order. Its keys are those of a one-layer module,
``{module}.l0.{kind}`` (``decoder.cell.l0.c``; a model that is itself a cell reads ``l0.h``), with
the kinds of its family (LSTM ``h c i f g o``, GRU ``h r z n``, RNN ``h``; gradients ``grad_h``,
``grad_c``) or, for a declared cell, its state kinds and the gates its gate function returns.
These keys are stable.

Inside a ``Probe`` block each cell's ``forward`` is a ``probe.cellstep.CellForward``, which runs
one step from the equations of the cell's own CPU kernel (bit for bit; checked against the kernel on
the first call of each batch size, dtype and device, to 1e-5 elsewhere than the CPU, whose fused
kernel rounds differently), applies an ``Intervention``'s edits if one holds the cell too, and hands
the step to the Probe's ``CellTape`` here: so the gates come out of the work the step does anyway,
and a Probe records the edited cell in either nesting.

Consecutive calls form one sequence while the batch stays or shrinks by dropping its last rows
(captions sorted longest first: ``h[:b_t]``); the rows gone read NaN. A call without state, or a
changed batch whose state is all zeros, starts a new sequence (``probe.cell_calls`` holds each);
a batch that grows with a carried state is refused. With ``grad=True`` a tensor hook on each
step's h and c receives the total dL/dh_t and dL/dc_t: through the loop, whatever the caller
does to the state between calls, and the layers above; nothing past a ``detach``. A Probe's
``carry`` does not touch a cell: its loop passes the state itself.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from rnnscope.errors import RnnscopeError, call_user

from . import cellstep
from .cellrows import StepGrads, StepRows
from .cellstep import BUILTIN, CellSpec, _gru, _lstm, _rnn, _rows, cell, spec_of  # noqa: F401  (the cells' API)
from .keys import state_key


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
    NaN where a row had left the batch. Its steps are kept in ``probe.cellrows`` blocks."""

    def __init__(self, name: str, kinds: list[str], rows: int):
        self.rows, self.batch = rows, rows
        self._kinds = {state_key(name, 0, False, k): k for k in kinds}
        self.kept = [k for k in kinds if not k.startswith("grad_")]
        self._graded = [k[5:] for k in kinds if k.startswith("grad_")]
        self.store: StepRows | None = None
        self.grads: StepGrads | None = None

    @property
    def steps(self) -> int:
        return 0 if self.store is None else self.store.steps

    def add(self, out: dict, b: int) -> int:
        """One step, ``out`` kind -> ``[b, units]`` (or unbatched); returns its index."""
        parts = [out[k] for k in self.kept]
        if self.store is None:
            self.store = StepRows(self.kept, parts, self.batch, out["h"].device)
            if self._graded:
                self.grads = StepGrads(self.store, {k: (out[k].shape[-1], out[k].dtype) for k in self._graded})
        return self.store.add(parts, b)

    def add_grad(self, kind: str, t: int, g: torch.Tensor) -> None:
        """A hook's dL/d(state) at step t; a second backward accumulates, as ``.grad`` does."""
        self.grads.add(kind, t, g)

    def swap_grads(self, grads: StepGrads | None = None) -> StepGrads | None:
        """The gradients recorded so far, replaced by ``grads`` (none yet, without): a backward that
        ``Probe.gradients_apart`` runs is kept apart from the ordinary one's."""
        old = self.grads
        self.grads = grads if grads is not None else old.emptied() if old is not None else None
        return old

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._kinds:
            raise KeyError(f"{key!r} was not recorded; recorded keys: {', '.join(self._kinds)}")
        kind = self._kinds[key]
        if kind.startswith("grad_"):
            if self.grads is None or self.grads.g is None:
                raise RnnscopeError("no gradient has reached the probed cell yet",
                                    "call loss.backward() on a loss computed inside the Probe(grad=True) block")
            return self.grads.kind(kind[5:])
        return self.store.kind(kind)

    def __iter__(self):
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return f"CellCall of {self.steps} step(s), batch {self.batch}: {', '.join(self._kinds)}"


def _stack(vs: list, B: int) -> torch.Tensor:
    """``T`` steps ``[b_t, units]`` with ``b_t <= B`` -> ``[B, T, units]``, NaN below each ``b_t``."""
    if all(v.shape[0] == B for v in vs):
        return torch.stack(vs, 1)
    out = vs[0].new_full((B, len(vs), vs[0].shape[-1]), float("nan"))
    for t, v in enumerate(vs):
        out[:v.shape[0], t] = v
    return out


def _fresh(state) -> bool:
    """A state that starts a sequence: none, or all zeros with no history."""
    parts = [] if state is None else list(state) if isinstance(state, (tuple, list)) else [state]
    return all(isinstance(s, torch.Tensor) and s.grad_fn is None and not s.count_nonzero() for s in parts)


class CellTape:
    """What one Probe records of one cell: each step its ``CellForward`` runs (``keep_step``, ``keep_declared``)."""

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
        t = seq.add(out, seq.rows)
        if seq.grads is not None:
            for k in states:
                v = out[k]
                if v.requires_grad:
                    v.register_hook(partial(seq.add_grad, k, t))

    def leaf(self, x, state):
        """``x`` as a leaf where nothing else would give the step a graph (frozen weights, no state
        with one, an input that needs no gradient), so hooks see dL/dh; else ``x`` itself: a leaf
        input costs a product with ``W_ih`` per step in the backward, for a gradient no one reads."""
        if not (self.probe.grad and torch.is_grad_enabled() and isinstance(x, torch.Tensor)) or x.requires_grad \
                or not x.is_floating_point():
            return x
        parts = [] if state is None else list(state) if isinstance(state, (tuple, list)) else [state]
        if any(isinstance(s, torch.Tensor) and s.requires_grad for s in parts) or \
                any(p.requires_grad for p in self.m.parameters()):
            return x
        return x.detach().requires_grad_()

    def keep_step(self, B: int, state, out: dict, states, gates) -> None:
        """One step of a built-in cell: ``out`` kind -> ``[B, units]`` (after any edit)."""
        self._keep(self._sequence(B, state, states, gates), out, states)

    def keep_declared(self, args, kwargs, own: dict, outs: dict) -> None:
        """One step of a declared cell: ``own`` its forward's states, ``outs`` what the caller receives
        (``own`` with any edit); its gate function, without a graph, checked against ``own`` on the first call."""
        spec = self.spec
        state = cellstep.declared_state(spec, args, kwargs)
        gates = {}
        if spec.gates is not None:
            with torch.no_grad():
                gates = call_user(spec.gates, self.m, *args, fix="fix the gate function given to rnnscope.cell",
                                  doing=f"the gate function of cell {self.name or '<model>'}", **kwargs)
            if "declared" not in self.checked:
                _check_gates(self.name, gates, own)
                self.checked.add("declared")
            gates = {k: v for k, v in gates.items() if k not in spec.kinds}
        B = _rows(outs["h"]).shape[0]
        self._keep(self._sequence(B, state, spec.kinds, tuple(gates)), {**outs, **gates}, spec.kinds)


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
    """Refuse, touching nothing, a cell whose forward someone else replaced, or that another Probe
    records; an Intervention's editing forward is rnnscope's own, and a Probe records the edited cell."""
    cellstep.refuse_foreign(cells)
    busy = [n for n, m in cells.items() if getattr(cellstep.forward_of(m), "tape", None) is not None]
    if busy:
        raise RnnscopeError(f"cell {busy[0] or '<model>'} is already recorded by another Probe",
                            "exit the other Probe first, or read what it records")


def join(cells: dict[str, nn.Module], probe) -> list[CellTape]:
    tapes = []
    for name, m in cells.items():
        fw = cellstep.hold(name, m)
        fw.tape = CellTape(probe, name, m)
        tapes.append(fw.tape)
    return tapes


def leave(tapes: list[CellTape]) -> None:
    """Each cell's own forward again once no Intervention edits it: the instance attribute removed."""
    for t in tapes:
        fw = cellstep.forward_of(t.m)
        if fw is not None and fw.tape is t:
            fw.tape = None
            cellstep.release(t.m)
