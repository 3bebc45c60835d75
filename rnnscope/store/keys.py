"""The one grammar of state keys and units, read by the probe, the command line and every reader.

``{module}.l{layer}[_reverse].{kind}``, e.g. ``rnn.l0.c`` or ``encoder.lstm.l1_reverse.h``; a unit is
``{key}:{index}``. The module is a dotted name of identifier-like segments (a ``Sequential``'s
children are digits, so ``0.l0.h`` is a key), so a key is never a path: no ``/``, ``..`` or NUL matches.
"""
from __future__ import annotations

import re

from rnnscope.errors import RnnscopeError, escaped

KEY = re.compile(r"^(?:(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.)?"
                 r"l(?P<layer>\d{1,4})(?P<reverse>_reverse)?\.(?P<kind>[A-Za-z][A-Za-z0-9_]*)$", re.ASCII)
UNIT = re.compile(KEY.pattern[:-1] + r":(?P<index>\d{1,9})$", re.ASCII)
MODULE = re.compile(r"^(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?$", re.ASCII)
FIX = "state keys are {module}.l{layer}[_reverse].{kind}, e.g. rnn.l0.c"


def attention_dir(name: str) -> str:
    """``attention/{name}``: an attention module's folder in a Run; ``name`` is a qualified module name
    (the grammar of a key's module, not empty), so it is never a path."""
    if not isinstance(name, str) or not name or not MODULE.match(name):
        raise RnnscopeError(f"{escaped(str(name), limit=80)!r} is not a module name like 'decoder.attn'",
                            "name attention modules by their qualified name (model.named_modules())")
    return f"attention/{name}"


def key_file(key: str) -> str:
    return f"states/{key}.npy"


def state_key(module: str, layer: int, reverse: bool, kind: str) -> str:
    """The root module (``model`` itself is an ``nn.LSTM``) has the empty name: its keys read ``l0.c``.
    A module whose name cannot be part of a key (``nn.ModuleDict({"a-b": ...})``) is refused."""
    if not MODULE.match(module):
        raise RnnscopeError(f"the module name {escaped(module, limit=80)!r} cannot be part of a state key",
                            "name recurrent modules with letters, digits and '_' (attributes, ModuleDict keys)")
    return f"{module + '.' if module else ''}l{layer}{'_reverse' if reverse else ''}.{kind}"


def parse_key(key: str) -> dict:
    """``'rnn.l1_reverse.c' -> {module: 'rnn', layer: 1, reverse: True, kind: 'c'}``; a key that does
    not follow the grammar is refused in one line."""
    m = KEY.match(key) if isinstance(key, str) else None
    if not m:
        raise RnnscopeError(f"{escaped(key, limit=80)!r} is not a state key like 'rnn.l0.c'", FIX)
    return {"module": m["module"] or "", "layer": int(m["layer"]), "reverse": bool(m["reverse"]), "kind": m["kind"]}


def parse_unit(unit: str) -> tuple[str, int]:
    """``'rnn.l0.c:12' -> ('rnn.l0.c', 12)``; whether a Run has it is for the Run to say."""
    m = UNIT.match(unit) if isinstance(unit, str) else None
    if not m:
        raise RnnscopeError(f"{escaped(unit, limit=80)!r} is not a unit", "write units as KEY:INDEX, e.g. rnn.l0.c:12")
    key, _, index = unit.rpartition(":")
    return key, int(index)


split_key = parse_key          # the store's older name, kept for callers outside rnnscope
