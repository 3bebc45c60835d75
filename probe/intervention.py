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
"""
from __future__ import annotations

from torch import nn

from rnnscope.errors import RnnscopeError

from . import engine, families
from .keys import parse_key, recurrent_modules, state_key


def module_of(key: str, modules: dict) -> str:
    name = parse_key(key)["module"]
    if name not in modules:
        raise RnnscopeError(f"no recurrent module {name or '<model>'!r} for key {key!r}",
                            f"use a key of {', '.join(repr(n) for n in modules) or 'a probed module'}")
    return name


class Intervention:
    """``with Intervention(model, {"rnn.l1.c": (mask, value)}): model(x)``.

    ``mask``: bool ``[units]`` or ``[batch, units]``; ``value``: a number, ``[units]`` or
    ``[batch, units]`` (what the masked units are set to: 0 to ablate, a mean, a clamp value).
    """

    def __init__(self, model: nn.Module, edits: dict):
        self.model, self.modules = model, recurrent_modules(model)
        self.edits: dict[str, dict] = {}
        for key, (mask, value) in edits.items():
            name = module_of(key, self.modules)
            m, info = self.modules[name], parse_key(key)
            family = families.of(m)
            if info["kind"] not in family.kinds:
                raise RnnscopeError(f"{key}: a {family.name} has no state {info['kind']!r}",
                                    f"edit one of {', '.join(family.kinds)}")
            if info["layer"] >= m.num_layers or (info["reverse"] and not m.bidirectional):
                raise RnnscopeError(f"{key}: {name or '<model>'} has no such layer or direction",
                                    f"it has {m.num_layers} layer(s){', bidirectional' if m.bidirectional else ''}")
            self.edits.setdefault(name, {})[(info["layer"], info["reverse"], info["kind"])] = (mask, value)

    def __enter__(self) -> "Intervention":
        engine.join({n: self.modules[n] for n in self.edits}, self, self.edits)
        return self

    def __exit__(self, *exc) -> None:
        engine.leave({n: self.modules[n] for n in self.edits}, self)

    def __repr__(self) -> str:
        edits = [state_key(n, layer, rev, kind) for n, ed in self.edits.items() for (layer, rev, kind) in ed]
        return f"Intervention({len(edits)} edited keys: {', '.join(edits[:8])}{', ...' if len(edits) > 8 else ''})"
