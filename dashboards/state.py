"""What the user has selected: one object every view reads and none owns."""
from __future__ import annotations

FIELDS = ("key", "index", "start", "feature", "document")


class Selection:
    """Which unit (``key``, ``index``), which page (``start``: its first step), which ``feature`` (neuron
    table, heatmap), which ``document`` (the one holding ``start``). ``set`` applies changes and
    tells every watcher which fields changed; setting a field to its value tells no one, so widgets
    that mirror the selection cannot loop."""

    def __init__(self, key: str, index: int, start: int = 0, feature: str | None = None, document: int = 0):
        self.key, self.index, self.start, self.feature, self.document = key, index, start, feature, document
        self._watchers = []

    @property
    def unit(self) -> str:
        return f"{self.key}:{self.index}"

    def watch(self, fn) -> None:
        """``fn(changed: set[str])`` after every change."""
        self._watchers.append(fn)

    def set(self, **changes) -> None:
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise TypeError(f"no selection field {sorted(unknown)}")
        changed = {k for k, v in changes.items() if getattr(self, k) != v}
        for k in changed:
            setattr(self, k, changes[k])
        if changed:
            for fn in list(self._watchers):
                fn(changed)
