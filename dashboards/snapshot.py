"""A served Run as one snapshot: every file the dashboard reads is opened once and kept open.

``rnnscope probe --overwrite`` swaps a new Run directory in under the old name and deletes the old
one; ``analyze`` swaps new tables into ``analysis/``. A server that reopened ``states/{key}.npy`` by
path on each request would draw one Run's text with another's values, or fail on a deleted file.
Memory maps keep their file's data readable after it is renamed over or unlinked (POSIX keeps an
open inode), so a session reads only what its ``HeldRun`` opened. Whether the Run on disk is still
that one is a cheap ``stat`` fingerprint, which a new session checks before it is built.
"""
from __future__ import annotations

import os
from pathlib import Path

from rnnscope.errors import RnnscopeError
from rnnscope.store import Run, open_run

TRIES = 3       # a Run swapped in while it is being opened is opened again, from the start


class HeldRun(Run):
    """``run`` with every state array and the loss opened now and kept: ``held[key]`` and ``held.loss``
    never touch the directory again (the text, spans, ids and documents are already in memory)."""

    def __init__(self, run: Run):
        super().__init__(run.path, run.manifest, run.text,
                         {"spans": run.spans, "documents": run.documents, "ids": run.ids})
        kind = type(run)                           # a sharded Run reads its shards' files, not RUN/states/
        self._arrays = {k: kind.__getitem__(run, k) for k in run.keys()}
        self._loss = kind.loss.fget(run)
        self.__dict__.update(_attention=dict(getattr(run, "_attention", {})), source=getattr(run, "source", None))   # mapped and read by open_run

    def __getitem__(self, key: str):
        if key in self._arrays:
            return self._arrays[key]
        return super().__getitem__(key)            # the Run's own one-line refusal for a key it lacks

    @property
    def loss(self):
        return self._loss


def fingerprint(path: Path) -> tuple:
    """What changes when the Run at ``path`` is replaced or its tables rewritten: the directory's and
    the manifest's inodes, and each analysis table's inode, size and time. Raises ``OSError`` when
    the Run is not there."""
    st, man = os.stat(path), os.stat(path / "manifest.json")
    tables = path / "analysis"
    listed = sorted((e.name, e.inode(), e.stat(follow_symlinks=False).st_size,
                     e.stat(follow_symlinks=False).st_mtime_ns) for e in os.scandir(tables)) if tables.is_dir() else []
    return (st.st_dev, st.st_ino, man.st_ino, man.st_size, man.st_mtime_ns, tuple(listed))


def same(path: Path, seen: tuple) -> bool:
    """Whether the Run at ``path`` is still the one fingerprinted as ``seen``."""
    try:
        return fingerprint(path) == seen
    except OSError:
        return False


def hold(path, read_tables) -> tuple[HeldRun, dict, tuple]:
    """``(run, tables, fingerprint)`` read from one and the same Run: ``read_tables(run)`` reads the
    analysis tables; a Run swapped in meanwhile is read again, up to ``TRIES`` times."""
    path = Path(path)
    for _ in range(TRIES):
        try:
            before = fingerprint(path)
        except OSError:
            before = None                          # open_run says what is missing, in one line
        run = HeldRun(open_run(path))
        tables = read_tables(run)
        if before is not None and same(path, before):
            return run, tables, before
    raise RnnscopeError(f"{path} kept changing while it was being opened",
                        "serve it once `rnnscope probe` or `analyze` has finished writing it")
