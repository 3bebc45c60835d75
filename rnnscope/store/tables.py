"""The Run's tables: ``RUN/units.parquet`` and ``RUN/analysis/{name}.parquet``, checked against a schema.

A table from someone else's Run reaches the dashboards' widgets, so it is data only: every column
named in its schema must be there with its type, other columns may only be numbers, booleans or
strings, and ``key`` / ``unit`` values must be state keys and units. A table that fails is refused
with one line naming the table and the column (rather than shown half-right): ``rnnscope analyze``
writes it again. Tables are written beside their final name and renamed, never through a link.
"""
from __future__ import annotations

import json
import os
import re
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rnnscope.errors import RnnscopeError, first_line

from .files import alive, atomic_write, inside, regular_file
from .keys import KEY, UNIT

S, I, F, B, FL = "string", "integer", "float", "bool", "floats"
_TYPES = {S: (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
          I: (pa.types.is_integer, pa.types.is_floating),            # floating: a whole column may hold NaN
          F: (pa.types.is_floating, pa.types.is_integer), B: (pa.types.is_boolean,),
          FL: (lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type),)}
_ANY = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null,
        *_TYPES[S], *_TYPES[FL])

UNITS_SCHEMA = {"unit": S, "key": S, "index": I, "module": S, "layer": I, "reverse": B, "kind": S,
                "mean": F, "std": F, "min": F, "max": F}
DOCUMENTS_SCHEMA = {"name": S, "char_start": I, "char_end": I, "step_start": I, "step_end": I}
SCHEMAS = {
    "neurons": {"unit": S, "key": S, "layer": I, "kind": S, "index": I, "feature": S, "metric": S, "direction": I,
                "score": F, "heldout_score": F, "q_value": F, "strength": F},
    "sparse": {"feature": S, "lam": F, "n_units": I, "metric": S, "heldout_score": F, "units": S},
    "saturation": {"key": S, "layer": I, "gate": S, "index": I, "unit": S, "left": F, "right": F, "mean": F},
    "grad_norms": {"step": I},                  # and one float column per gradient key
    "features": {"step": I},                    # and one float column per user feature
    "grad_decay": {"key": S, "layer": I, "kind": S, "lag": I, "mean": F, "geo_mean": F, "q10": F, "q90": F,
                   "positions": I},
    "half_lives": {"key": S, "layer": I, "kind": S, "slope_per_step": F, "half_life": F, "fit_r2": F,
                   "lag_to_1pct": I, "max_lag": I, "exploding": B},
    "contexts": {"unit": S, "key": S, "index": I, "side": S, "rank": I, "step": I, "value": F, "start": I,
                 "offset": I, "context": S, "values": FL},
    "ablation": {"units": S, "role": S, "mode": S, "effect": F, "effect_elsewhere": F, "effect_size": F,
                 "p_value": F, "beats_controls": F, "feature": S},
}
# columns a table may lack (written before they were added) but that hold their kind when present
OPTIONAL = {"contexts": {"token_start": I, "token_end": I}}
# columns every row must fill: positions and ranks are whole numbers (an integer column read back as
# floats may hold NaN, and ``int(nan)`` was a crash in the report), and a window's text is never null
WHOLE = {"contexts": ("index", "rank", "step", "start", "offset", "token_start", "token_end")}
PRESENT = {"contexts": ("unit", "key", "side", "context")}
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# what one table may hold, checked from its footer and then while it is read: the largest tables rnnscope
# writes (grad_norms of a million steps and 32 gradient keys; contexts of 8,192 units) are 256 MB as
# Arrow data; a 220 KB file of repeated rows that unpacks to 2.2 GB (a pandas frame twice or thrice
# that) is refused before it is held
MAX_ROWS, MAX_BYTES, BATCH = 20_000_000, 512 << 20, 65_536
# contexts: 2 sides x k windows per unit, each with its text and values (~1 KB a row); 8,192 units at
# --contexts 100 is 1.6M rows; 5M rows ended in MemoryError under a 4 GB address space
ROWS = {"contexts": 2_000_000}
ANALYZE = "run `rnnscope analyze RUN` again"


def _schema_of(name: str) -> dict:
    if not isinstance(name, str) or not NAME.match(name):
        raise RnnscopeError(f"{str(name)[:40]!r} is not a table name", f"use one of {', '.join(SCHEMAS)}")
    return SCHEMAS.get(name, {})


def _check(schema: pa.Schema, want: dict, where, fix: str = ANALYZE, optional: dict | None = None) -> None:
    got = {f.name: f.type for f in schema if f.name != "__index_level_0__"}
    for col, kind in {**{c: k for c, k in (optional or {}).items() if c in got}, **want}.items():
        if col not in got:
            raise RnnscopeError(f"{where} lacks the column {col!r}", fix)
        if not (pa.types.is_null(got[col]) or any(ok(got[col]) for ok in _TYPES[kind])):
            raise RnnscopeError(f"{where}: column {col!r} holds {got[col]}, expected {kind}", fix)
    for col, typ in got.items():
        if not any(ok(typ) for ok in _ANY):
            raise RnnscopeError(f"{where}: column {str(col)[:40]!r} holds {typ}, not numbers, booleans or text",
                                fix)


def check_schema(path: Path, want: dict, fix: str = ANALYZE, optional: dict | None = None) -> None:
    """Check a Parquet file's schema (its footer only) against ``want`` (and ``optional`` where
    present): column -> kind."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise RnnscopeError(f"{path} is not a readable Parquet table ({first_line(err, 100)})",
                            fix) from None
    _check(schema, want, path, fix, optional)


def footer_rows(path: Path, fix: str = ANALYZE) -> int:
    """The rows a Parquet file's footer declares (nothing else is read)."""
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError, ValueError) as err:
        raise RnnscopeError(f"{path} is not a readable Parquet table ({first_line(err, 100)})", fix) from None


def _check_values(frame: pd.DataFrame, where, name: str = "") -> None:
    """``key`` and ``unit`` columns (and ``grad_norms``' column names) must be state keys and units."""
    for col, pattern in (("key", KEY), ("unit", UNIT)):
        if col in frame:
            values = frame[col].dropna().astype(str)
            bad = values[~values.str.match(pattern.pattern)]
            if len(bad):
                raise RnnscopeError(f"{where}: {col} {str(bad.iloc[0])[:60]!r} is not a state {col}", ANALYZE)
    for col in WHOLE.get(name, ()):
        if col in frame:
            values = frame[col].to_numpy(dtype=float, na_value=np.nan)
            bad = ~np.isfinite(values) | (values != np.round(values))
            if bad.any():
                raise RnnscopeError(f"{where}: column {col!r} holds a missing or non-whole value "
                                    f"({values[bad][0]!r} in row {int(np.argmax(bad)):,})", ANALYZE)
    for col in PRESENT.get(name, ()):
        if col in frame and frame[col].isna().any():
            raise RnnscopeError(f"{where}: column {col!r} holds a missing value (row "
                                f"{int(np.argmax(frame[col].isna().to_numpy())):,})", ANALYZE)
    if name == "grad_norms":
        for col in frame.columns:
            if col != "step" and not (KEY.match(str(col)) and pd.api.types.is_float_dtype(frame[col])):
                raise RnnscopeError(f"{where}: column {str(col)[:60]!r} is not a gradient key of floats", ANALYZE)


def _bounded(path: Path, rows: int = MAX_ROWS, fix: str = ANALYZE) -> pa.Table:
    """The table at ``path``, read in batches of ``BATCH`` rows and refused as soon as its rows or bytes
    pass ``MAX_ROWS`` / ``MAX_BYTES`` (the footer's own counts first: they are someone else's too)."""
    f = pq.ParquetFile(path)
    md = f.metadata
    declared = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    if md.num_rows > rows or declared > MAX_BYTES:
        raise RnnscopeError(f"{path} holds {md.num_rows:,} rows ({declared >> 20:,} MB), more than this "
                            f"table can ({rows:,} rows, {MAX_BYTES >> 20} MB)", fix)
    batches, size = [], 0
    for batch in f.iter_batches(batch_size=BATCH):
        size += batch.nbytes
        if size > MAX_BYTES:
            raise RnnscopeError(f"{path} unpacks to more than {MAX_BYTES >> 20} MB", fix)
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=f.schema_arrow)


def read_parquet(path: Path, want: dict, name: str = "", rows: int | None = None,
                 fix: str = ANALYZE) -> pd.DataFrame:
    """The table at ``path``, checked against ``want``; ``rows``: the most it may hold (the count its
    Run's manifest gives), else its table's bound; ``fix`` ends each refusal."""
    check_schema(path, want, fix, OPTIONAL.get(name))
    try:
        frame = _bounded(path, ROWS.get(name, MAX_ROWS) if rows is None else rows, fix).to_pandas()
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as err:
        # KeyError / IndexError: pandas metadata naming an index column the file lacks
        raise RnnscopeError(f"{path} is not a readable Parquet table ({type(err).__name__}: "
                            f"{first_line(err, 100)})", fix) from None
    _check_values(frame, path, name)
    return frame


def _arrow(path: Path, frame: pd.DataFrame, want: dict, name: str) -> pa.Table:
    """``frame`` as the Arrow table to write, checked against the schema the reader will apply."""
    frame = frame.copy(deep=False)
    frame.attrs = {}
    table = pa.Table.from_pandas(frame)
    _check(table.schema, want, f"the {name or path.stem} table", optional=OPTIONAL.get(name))
    _check_values(frame, f"the {name or path.stem} table", name)
    return table


def write_parquet(path: Path, frame: pd.DataFrame, want: dict, name: str = "") -> Path:
    """Write ``frame`` atomically after checking it against the schema the reader will apply."""
    table = _arrow(path, frame, want, name)
    return atomic_write(path, lambda p: pq.write_table(table, p))


# what ``atomic_write`` leaves beside a table when its writer is SIGKILLed: ``.{file}.{PID}-XXXXXXXX``
TEMPORARY = re.compile(r"^\.([a-z][a-z0-9_]{0,63}\.(?:parquet|json))\.(\d+)-\w+$")


def clear_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone (a killed ``analyze``); a live writer's stay."""
    gone = []
    for p in folder.iterdir() if folder.is_dir() and not folder.is_symlink() else ():
        m = TEMPORARY.match(p.name)
        if m and int(m[2]) != os.getpid() and not alive(int(m[2])) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM held off (and delivered after): the renames between are all done or none."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def write_tables(run, frames: dict[str, pd.DataFrame], jsons: dict[str, dict] | None = None) -> list[Path]:
    """Every table (and JSON summary) of one analysis, all or none: each is checked and written beside
    its name first, and only then are all renamed, with Ctrl-C held off for those renames: an
    interrupt or a failure before leaves every old table as it was, and no temporary. Temporaries a
    killed writer left in ``analysis/`` are removed first."""
    root = _root(run)
    folder = inside(root, "analysis", write=True)
    folder.mkdir(exist_ok=True)
    clear_temporaries(folder)
    staged: list[tuple[Path, Path]] = []

    def stage(file: str, write) -> None:
        path = inside(root, f"analysis/{file}", write=True)
        with _signals_held():           # created and listed at once: an interrupt after still removes it
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", dir=folder)
            staged.append((Path(tmp), path))
        os.close(fd)
        write(Path(tmp))
    try:
        for name, frame in frames.items():
            table = _arrow(folder / f"{name}.parquet", frame, _schema_of(name), name)
            stage(f"{name}.parquet", lambda p: pq.write_table(table, p))
        for name, value in (jsons or {}).items():
            _schema_of(name)
            stage(f"{name}.json", lambda p: p.write_text(json.dumps(value, indent=1), encoding="utf-8"))
        with _signals_held():
            for tmp, path in staged:
                os.replace(tmp, path)
            done, staged = [path for _, path in staged], []
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return done


def _root(run) -> Path:
    return Path(getattr(run, "path", run))


def table_path(run, name: str) -> Path:
    """``RUN/analysis/{name}.parquet``, refused if it leads out of the Run."""
    _schema_of(name)
    return inside(_root(run), f"analysis/{name}.parquet")


def write_table(run, name: str, frame: pd.DataFrame) -> Path:
    want = _schema_of(name)
    path = inside(_root(run), f"analysis/{name}.parquet", write=True)
    return write_parquet(path, frame, want, name)


def read_table(run, name: str) -> pd.DataFrame | None:
    """A table ``analyze`` wrote, or None when it has not been run (or had no data for it)."""
    path = table_path(run, name)
    if not path.exists():
        return None
    regular_file(path, "the analysis table", ANALYZE)
    return read_parquet(path, _schema_of(name), name)


def write_json(run, name: str, value: dict) -> Path:
    """``RUN/analysis/{name}.json``, atomically, never through a link."""
    _schema_of(name)
    path = inside(_root(run), f"analysis/{name}.json", write=True)
    return atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=1), encoding="utf-8"))
