"""The watch log: an append-only record of gradient flow while a network trains (issue 14).

    LOG/watch.json                               manifest: format, version, created, every, model, keys
    LOG/blocks/{first:012d}-{last:012d}.arrow    one block of watched steps, an Arrow IPC file
    LOG/.lock                                    flock held by the one writer

A block holds four tables (steps, timesteps, decay, layers) as one Arrow file with a ``table``
column and the union of their columns; the reader hands each table back with its own columns.
A block is written beside its name and renamed in whole, so a kill at any instant leaves the
blocks before it intact and no half block under a block's name. A block that is still unreadable
(a disk that lost its tail) is dropped with a warning when it is the last one, and moved aside
the next time a writer opens the log; a bad block before the last is an error, since dropping it
would silently lose history. The Arrow file format ends in a footer, so a torn file never reads.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rnnscope.errors import RnnscopeError, first_line

from .files import atomic_write, inside, read_bytes
from .ipc import declared_size
from .keys import KEY

FORMAT, FORMAT_VERSION = "rnnscope-watch", 1
MANIFEST, BLOCKS, LOCK = "watch.json", "blocks", ".lock"
# a block's name; a second block over the same steps (the step went backwards) gets ``.{n}``
BLOCK = re.compile(r"^(\d{12})-(\d{12})(?:\.(\d{1,6}))?\.arrow$")
# a layer's state-key prefix ("rnn.l0", "l1_reverse"): a state key without its kind
LAYER = re.compile(KEY.pattern[:KEY.pattern.index(r"\.(?P<kind>")] + "$", re.ASCII)
GATES = ("sat_i", "sat_f", "sat_o", "sat_r", "sat_z", "sat_h")
FLAGS = ("nonfinite_loss", "nonfinite_grad", "step_backwards")
_I, _F, _B, _S = pa.int64(), pa.float64(), pa.bool_(), pa.string()
SCHEMAS = {
    "steps": pa.schema([("step", _I), ("wall", _F), ("loss", _F), ("loss_finite", _B), ("grad_norm", _F),
                        ("grad_norm_after", _F), ("clipped", _B), ("clips", _I), ("flags", _S)]),
    "timesteps": pa.schema([("step", _I), ("key", _S), ("t", _I), ("lag", _I), ("mean", _F), ("max", _F)]),
    "decay": pa.schema([("step", _I), ("key", _S), ("lag", _I), ("norm", _F)]),
    "layers": pa.schema([("step", _I), ("key", _S), ("half_life", _F), ("param_grad_norm", _F),
                         *((g, _F) for g in GATES)]),
}
TABLES = tuple(SCHEMAS)
# columns added after format 1 was first written: a block without them reads as this value
ADDED = {("steps", "clips"): 0}
_MANIFEST_LIMIT = 1 << 20
# a block is the tables of ``flush_every`` watched steps: steps x keys x lags rows, kilobytes to a few
# MB; a larger file (a 57 MB compressed block unpacked to 4 GB) is refused before it is read
BLOCK_LIMIT = 64 << 20
# and once decompressed (its own footer's count, before anything is unpacked): four times a block that
# large uncompressed, and rows for 10 steps x 32 keys x a BPTT window of 25,000 lags
UNPACKED_LIMIT, BLOCK_ROWS = 256 << 20, 8_000_000
# a lag or timestep is a position in one training sequence: no BPTT window is longer, and a lag of 1e12
# in one row sized a 7 TiB array for its plot
MAX_LAG = 10_000_000
NOT_LOG = "point at the folder a Watch wrote (its out=)"
LINKED = "the log is damaged or hostile; point at a watch log whose files are its own"


def _block_name(first: int, last: int, n: int = 0) -> str:
    return f"{first:012d}-{last:012d}{'' if not n else f'.{n}'}.arrow"


def _block_order(name: str) -> tuple:
    m = BLOCK.match(name)
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _in_log(log: Path, name: str, write: bool = False) -> Path:
    """``LOG/name``, refused when a link takes it out of the log (or, to write, when it is a link at all)."""
    return inside(log, name, write=write, what="the watch log", fix=LINKED)


def block_names(log: Path) -> list[str]:
    """The blocks under ``LOG/blocks`` in order; temporary and moved-aside files are not blocks."""
    d = _in_log(log, BLOCKS)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if BLOCK.match(p.name)), key=_block_order)


def last_written(log: Path, names: list[str]) -> set[str]:
    """The blocks a kill may have torn: the last by name and the one written last. Steps that go back
    (training resumed from an earlier checkpoint) give a new block a name before older ones, so the
    last written is found by its time, the name breaking ties."""
    def written(name):
        try:
            return (log / BLOCKS / name).lstat().st_mtime_ns, _block_order(name)
        except FileNotFoundError:
            return (-1,), _block_order(name)
    return {names[-1], max(names, key=written)} if names else set()


def _check_manifest(m, path: Path) -> dict:
    where = f"the watch log manifest {path}"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RnnscopeError(f"{path} is not an rnnscope watch log manifest", NOT_LOG)
    if m.get("format_version") != FORMAT_VERSION:
        raise RnnscopeError(f"{where} has format_version {str(m.get('format_version'))[:20]!r}; "
                            f"this rnnscope reads {FORMAT_VERSION}", "upgrade rnnscope")
    every = m.get("every")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise RnnscopeError(f"{where}: 'every' is not a positive integer", "the log is damaged; watch again")
    keys = m.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and KEY.match(k) for k in keys):
        raise RnnscopeError(f"{where}: 'keys' is not a non-empty list of state keys", "the log is damaged; watch again")
    if not isinstance(m.get("model"), dict) or not isinstance(m["model"].get("modules"), dict):
        raise RnnscopeError(f"{where}: 'model' lacks its modules", "the log is damaged; watch again")
    return m


def read_manifest(log: Path) -> dict:
    path = _in_log(log, MANIFEST)
    raw = read_bytes(path, "the watch log manifest", NOT_LOG, _MANIFEST_LIMIT)
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RnnscopeError(f"{path} is not JSON", "the log is damaged; watch again") from None
    return _check_manifest(m, path)


def is_watch_log(path) -> bool:
    """Whether ``path`` is a folder holding a watch log manifest (not checked beyond its format field).
    A damaged ``watch.json`` in a folder with no Run manifest counts too, so that opening it says what
    is wrong with the log rather than that the folder is no Run."""
    try:
        m = json.loads(read_bytes(Path(path) / MANIFEST, "", "", _MANIFEST_LIMIT).decode("utf-8"))
    except (RnnscopeError, OSError, ValueError, RecursionError):
        return (Path(path) / MANIFEST).is_file() and not (Path(path) / "manifest.json").exists()
    return isinstance(m, dict) and m.get("format") == FORMAT


def _read_block(path: Path) -> dict[str, pa.Table]:
    """One block's four tables; raises ``ValueError`` with a short reason when it is unreadable or wrong."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > BLOCK_LIMIT:
        raise ValueError(f"it is {st.st_size:,} bytes, more than a block can be ({BLOCK_LIMIT >> 20} MB)")
    # read whole rather than mapped: a file cut short under a live view would be a SIGBUS, not an error
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        data = f.read(BLOCK_LIMIT + 1)
    size, rows = declared_size(data)
    if size > UNPACKED_LIMIT or rows > BLOCK_ROWS:
        raise ValueError(f"it unpacks to {size:,} bytes in {rows:,} rows, more than a block can "
                         f"({UNPACKED_LIMIT >> 20} MB, {BLOCK_ROWS:,} rows)")
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        table.validate(full=True)       # offsets inside their buffers before anything reads the strings
        return _split(table)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(first_line(err, 100)) from None


def _split(table: pa.Table) -> dict[str, pa.Table]:
    """A block's union table as its four tables, each cast to its schema and checked."""
    if "table" not in table.column_names:
        raise ValueError("it has no 'table' column")
    if not pa.types.is_string(table.schema.field("table").type):
        raise ValueError(f"its 'table' column holds {table.schema.field('table').type}, not text (a wrong schema)")
    nulls = [f.name for f in table.schema if pa.types.is_null(f.type)]
    if nulls:           # no column of a block is untyped; a null column of 1e9 rows costs nothing on disk
        raise ValueError(f"its column {nulls[0][:40]!r} has no type (a wrong schema)")
    out = {}
    for name, schema in SCHEMAS.items():
        part = table.filter(pc.equal(table["table"], name))
        cols = {}
        for f in schema:
            if f.name not in part.column_names and (name, f.name) in ADDED:
                cols[f.name] = pa.array([ADDED[name, f.name]] * len(part), f.type)
                continue
            if f.name not in part.column_names:
                raise ValueError(f"it lacks the {name} column {f.name!r}")
            try:
                cols[f.name] = part[f.name].cast(f.type)
            except (pa.ArrowException, ValueError):
                raise ValueError(f"its {name} column {f.name!r} holds {part[f.name].type}, not {f.type}") from None
        part = pa.table(cols, schema=schema)
        # checked in Arrow, block by block (a bad one is named); pandas only once, for the whole log
        for col in ("lag", "t"):
            if col in schema.names and len(part):
                inside_ = pc.and_(pc.greater_equal(part[col], 0), pc.less_equal(part[col], MAX_LAG))
                bad = pc.invert(pc.fill_null(inside_, False))
                if pc.any(bad).as_py():
                    raise ValueError(f"its {name} {col} {part[col].filter(bad)[0].as_py()} is not a position in a "
                                     f"sequence (0 to {MAX_LAG:,})")
        if "key" in schema.names and len(part):
            pattern = LAYER if name == "layers" else KEY
            bad = pc.invert(pc.fill_null(pc.match_substring_regex(part["key"], pattern.pattern), False))
            if pc.any(bad).as_py():
                raise ValueError(f"its {name} key {str(part['key'].filter(bad)[0].as_py())[:60]!r} is not a state "
                                 "key or layer")
        frame = part
        out[name] = frame
    return out


class WatchLog:
    """A watch log opened for reading: ``log.steps / timesteps / decay / layers`` are DataFrames of every
    block read so far (in block order); ``refresh()`` reads the blocks written since."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RnnscopeError(f"{self.path} is not a folder holding a watch log", NOT_LOG)
        self.manifest = read_manifest(self.path)
        self._frames = {name: [SCHEMAS[name].empty_table()] for name in TABLES}      # Arrow, block by block
        self._cache: dict[str, pd.DataFrame] = {}
        self._read: set[str] = set()
        self.dropped: str | None = None        # the torn last block skipped, if any
        self.refresh()

    def refresh(self) -> int:
        """Read the blocks that appeared since the last read; returns how many watched steps they add."""
        names = block_names(self.path)
        new = [n for n in names if n not in self._read]
        added, dropped, tearable = 0, None, last_written(self.path, names)
        for name in new:
            try:
                tables = _read_block(self.path / BLOCKS / name)
            except FileNotFoundError:       # moved aside by a writer between listing and reading
                continue
            except ValueError as err:
                if name not in tearable:
                    raise RnnscopeError(f"the watch log block {self.path / BLOCKS / name} is unreadable ({err}), "
                                        "and it is not the last one", "restore it, or move it aside to drop "
                                        "those steps knowingly") from None
                if name != self.dropped:            # once, not on every refresh of a live view
                    warnings.warn(f"rnnscope: the last watch log block {name} is torn or wrong ({err}); its steps are "
                                  "dropped", stacklevel=2)
                dropped = name
                continue
            self._read.add(name)
            for t in TABLES:
                self._frames[t].append(tables[t])
            added += len(tables["steps"])
        self.dropped = dropped
        if added:
            self._cache.clear()
        return added

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._cache:
            frames = pa.concat_tables(self._frames[name])       # one conversion for every block read
            self._frames[name] = [frames]
            self._cache[name] = frames.to_pandas()
        return self._cache[name]

    steps = property(lambda self: self._table("steps"))
    timesteps = property(lambda self: self._table("timesteps"))
    decay = property(lambda self: self._table("decay"))
    layers = property(lambda self: self._table("layers"))


def open_watch_log(path) -> WatchLog:
    """Open a watch log for reading (one-line ``RnnscopeError`` if it is not one or its manifest is bad)."""
    return WatchLog(path)


class WatchLogWriter:
    """Appends blocks to ``path``, creating the log or continuing one. Holds ``LOG/.lock`` until
    ``close()``: a second writer on the same log is refused with one line."""

    def __init__(self, path, every: int, model: dict, keys: list[str]):
        self.path = Path(path)
        for name in (BLOCKS, MANIFEST, LOCK):            # nothing is written through a link
            _in_log(self.path, name, write=True)
        try:
            (self.path / BLOCKS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RnnscopeError(f"cannot create the watch log folder {self.path} ({err.strerror})",
                                "pass an out= folder you can write to") from None
        if not self.path.is_dir() or (self.path / BLOCKS).is_symlink():
            raise RnnscopeError(f"{self.path} is not a folder a watch log can be written to", "pass another out=")
        try:    # O_NOFOLLOW: a link put there between the check and the open is refused, not followed
            self._lock = os.fdopen(os.open(self.path / LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                                           | os.O_CLOEXEC, 0o644), "a")
        except OSError as err:
            raise RnnscopeError(f"cannot open the watch log's lock {self.path / LOCK} ({err.strerror})",
                                "pass an out= folder you can write to, with no link inside") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RnnscopeError(f"the watch log {self.path} is in use by another Watch",
                                "close that Watch first, or pass another out=") from None
        try:
            self.manifest = self._start(every, model, keys)
        except BaseException:
            self.close()
            raise
        self.last_step = self._last_step()

    def _start(self, every, model, keys) -> dict:
        for p in (self.path / BLOCKS).iterdir():       # a kill mid-write leaves its temporary file
            if p.name.startswith(".") and p.is_file():
                p.unlink()
        if (self.path / MANIFEST).exists():
            m = read_manifest(self.path)
            if m["model"].get("modules") != model.get("modules"):
                raise RnnscopeError(f"{self.path} holds the watch log of a model with other recurrent modules",
                                    "pass another out=, or remove that log")
            return m
        if any((self.path / BLOCKS).iterdir()):
            raise RnnscopeError(f"{self.path} holds blocks but no {MANIFEST}", "pass another out=")
        m = _check_manifest({"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(),
                             "every": int(every), "model": model, "keys": list(keys)}, self.path / MANIFEST)
        atomic_write(self.path / MANIFEST, lambda p: p.write_text(json.dumps(m, indent=1), encoding="utf-8"))
        return m

    def _last_step(self) -> int | None:
        """The largest step already logged (a torn last block is moved aside first)."""
        names = block_names(self.path)
        for name in sorted(last_written(self.path, names)):
            try:
                _read_block(self.path / BLOCKS / name)
            except ValueError as err:
                aside = self.path / BLOCKS / f"{name}.torn"
                os.replace(self.path / BLOCKS / name, aside)
                warnings.warn(f"rnnscope: the last watch log block was torn ({err}); moved aside to {aside.name}",
                              stacklevel=3)
                names.remove(name)
        return max((_block_order(n)[1] for n in names), default=None)

    def append(self, tables: dict[str, pd.DataFrame]) -> Path:
        """Write one block from the four tables (each with its schema's columns); returns its path."""
        parts = []
        for name, schema in SCHEMAS.items():
            t = pa.Table.from_pandas(tables[name][schema.names], schema=schema, preserve_index=False)
            parts.append(t.append_column("table", pa.array([name] * len(t), _S)))
        block = pa.concat_tables(parts, promote_options="default")
        steps = tables["steps"]["step"]
        if not len(steps):
            raise ValueError("a block holds at least one step")
        first, last, n = int(steps.min()), int(steps.max()), 0
        while (self.path / BLOCKS / _block_name(first, last, n)).exists():   # never over an earlier block
            n += 1
        path = self.path / BLOCKS / _block_name(first, last, n)

        def write(p):
            with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, block.schema) as w:
                w.write_table(block)
            with open(p, "rb") as f:                   # on disk before the rename makes it a block
                os.fsync(f.fileno())
        atomic_write(path, write)
        self.last_step = last if self.last_step is None else max(self.last_step, last)
        return path

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def open_input(path):
    """What ``analyze``, ``serve`` and ``export`` were given: a watch log (``WatchLog``) or a Run
    (``Run``), each opened and checked by its own reader."""
    if is_watch_log(path):
        return open_watch_log(path)
    from .run import open_run
    return open_run(path)
