"""Edit units during the real forward pass of the unmodified model: the Probe's sibling strategy.

``Intervention(model, edits)`` registers, for the duration of a ``with`` block, its edits with the
layer engine of each recurrent module that an edit touches (``rnnscope.probe.engine``; the weights
are the module's own). Layers without edits run through the fused kernel; an edited layer runs one
step at a time, because an edit at step t changes every later step: the input projection is still
one batched product, the recurrence is the family's cell (``rnnscope.probe.families``), and each
edited state is replaced as soon as it is computed:

    c_t <- where(mask_c, value_c, c_t)     then     h_t = o_t * tanh(c_t)      (LSTM)
    h_t <- where(mask_h, value_h, h_t)                                          (every family)
    gates (i f g o / r z n) are replaced right after their nonlinearity.

Masks and values are ``[batch, units]``: each batch element may edit different units, which is how
``ablate`` runs a unit and its random controls in one batched pass. A ``Probe`` inside or around
the block records the edited model: its states, gates and gradients.

A cell of a step loop (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``: keys ``{cell}.l0.{kind}``)
is edited at every call, each call one step, in the same order (``probe.cellstep``); where its batch
shrinks by dropping its last rows, ``[batch, units]`` edits keep their first rows. A cell declared
with ``rs.cell`` runs the user's own forward, so only the ``h`` it returns can be edited.
"""
from __future__ import annotations

from torch import nn

from rnnscope.errors import RnnscopeError

from . import cellstep, engine, families
from .cells import cell_modules, known_kinds
from .keys import parse_key, recurrent_modules, state_key


def module_of(key: str, modules: dict) -> str:
    name = parse_key(key)["module"]
    if name not in modules:
        raise RnnscopeError(f"no recurrent module {name or '<model>'!r} for key {key!r}",
                            f"use a key of {', '.join(repr(n) for n in modules) or 'a probed module'}")
    return name


def editable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every module an ``Intervention`` edits: the recurrent modules, then the cells."""
    return {**recurrent_modules(model), **cell_modules(model)}


class Intervention:
    """``with Intervention(model, {"rnn.l1.c": (mask, value)}): model(x)``.

    ``mask``: bool ``[units]`` or ``[batch, units]``; ``value``: a number, ``[units]`` or
    ``[batch, units]`` (what the masked units are set to: 0 to ablate, a mean, a clamp value).
    Keys of a step loop's cells (``decoder.cell.l0.h``) edit the cell at every call.
    """

    def __init__(self, model: nn.Module, edits: dict):
        self.model, self.modules = model, recurrent_modules(model)
        self.cells: dict[str, nn.Module] = {}
        self.edits: dict[str, dict] = {}
        self.cell_edits: dict[str, dict] = {}
        for key, (mask, value) in edits.items():
            info = parse_key(key)
            if info["module"] not in self.modules:
                self.cells = self.cells or cell_modules(model)
                name = module_of(key, {**self.modules, **self.cells})
                self.cell_edits.setdefault(name, {})[_cell_kind(key, name, self.cells[name], info)] = (mask, value)
                continue
            name = info["module"]
            m, family = self.modules[name], families.of(self.modules[name])
            if info["kind"] not in family.kinds:
                raise RnnscopeError(f"{key}: a {family.name} has no state {info['kind']!r}",
                                    f"edit one of {', '.join(family.kinds)}")
            if info["layer"] >= m.num_layers or (info["reverse"] and not m.bidirectional):
                raise RnnscopeError(f"{key}: {name or '<model>'} has no such layer or direction",
                                    f"it has {m.num_layers} layer(s){', bidirectional' if m.bidirectional else ''}")
            self.edits.setdefault(name, {})[(info["layer"], info["reverse"], info["kind"])] = (mask, value)

    def __enter__(self) -> "Intervention":
        edited_cells = {n: self.cells[n] for n in self.cell_edits}
        cellstep.refuse_foreign(edited_cells)            # before touching anything, as engine.join checks
        engine.join({n: self.modules[n] for n in self.edits}, self, self.edits)
        cellstep.join_edits(edited_cells, self, self.cell_edits)
        return self

    def __exit__(self, *exc) -> None:
        engine.leave({n: self.modules[n] for n in self.edits}, self)
        cellstep.leave_edits({n: self.cells[n] for n in self.cell_edits}, self)

    def __repr__(self) -> str:
        edits = [state_key(n, layer, rev, kind) for n, ed in self.edits.items() for (layer, rev, kind) in ed]
        edits += [state_key(n, 0, False, kind) for n, ed in self.cell_edits.items() for kind in ed]
        return f"Intervention({len(edits)} edited keys: {', '.join(edits[:8])}{', ...' if len(edits) > 8 else ''})"


def _cell_kind(key: str, name: str, m: nn.Module, info: dict) -> str:
    """The kind ``key`` edits in cell ``m``, or one line saying why it cannot be edited."""
    declared = isinstance(cellstep.spec_of(m), cellstep.CellSpec)
    kinds = ("h",) if declared else known_kinds(m)
    what = f"{name or '<model>'} ({'declared with rs.cell' if declared else f'an nn.{type(m).__name__}'})"
    if info["layer"] != 0 or info["reverse"]:
        raise RnnscopeError(f"{key}: {what} has one layer and one direction",
                            f"use {state_key(name, 0, False, info['kind'])}")
    if info["kind"] not in kinds:
        if declared:
            raise RnnscopeError(f"{key}: {what} computes its {info['kind']!r} inside its own forward, where "
                                "rnnscope cannot edit it; only the h it returns can be edited",
                                f"edit {state_key(name, 0, False, 'h')}, or write the cell from nn.LSTMCell, "
                                "nn.GRUCell or nn.RNNCell")
        raise RnnscopeError(f"{key}: {what} has no state {info['kind']!r}", f"edit one of {', '.join(kinds)}")
    return info["kind"]
