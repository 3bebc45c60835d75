"""Names a package exports, imported on first use: importing ``rnnscope.store.keys`` or
``rnnscope.analysis.patterns`` runs its package's ``__init__``, which must then cost nothing (no
torch for a Run reader, no pandas for the key grammar)."""
from __future__ import annotations

from importlib import import_module


def exports(package: str, table: dict[str, str], namespace: dict):
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps each public name to the module
    (relative to ``package``, or absolute when it starts with ``rnnscope``) that defines it; a name that
    is the module's own last part (``"features": "features"``) is that module."""
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = table[name]
        module = import_module(where if where.startswith("rnnscope") else f"{package}.{where}")
        value = module if where.rsplit(".", 1)[-1] == name else getattr(module, name)   # a (sub)module, or a name in one
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))
    return __getattr__, __dir__
