"""The Run store: the one place that knows how a Run and its tables lie on disk.

It sits at the bottom of the stack beside ``rnnscope.errors`` and imports only NumPy, pandas,
pyarrow and the standard library: ``probe.record`` streams into a ``RunWriter``, ``open_run``
reads a Run back (checking everything in it first), ``read_table`` / ``write_table`` hold the
analysis tables, ``atomic_write`` is the single atomic file write (checkpoints use it too),
``keys`` holds the one grammar of state keys and units, and ``layout`` the one step layout.
Names are imported on first use, so the key grammar costs no pandas import.
"""
from __future__ import annotations

from rnnscope.lazy import exports

_API = {
    "atomic_write": "files", "inside": "files", "regular_file": "files",
    "DTYPES": "format", "FORMAT": "format", "FORMAT_VERSION": "format", "check_steps": "format",
    "KEY": "keys", "UNIT": "keys", "key_file": "keys", "parse_key": "keys", "parse_unit": "keys",
    "split_key": "keys", "state_key": "keys",
    "StepLayout": "layout", "char_spans": "layout", "documents_frame": "layout", "one_document": "layout",
    "Run": "run", "is_run": "run", "open_run": "run", "open_input": "watchlog",
    "DOCUMENTS_SCHEMA": "tables", "SCHEMAS": "tables", "read_table": "tables", "table_path": "tables",
    "write_json": "tables", "write_table": "tables",
    "NpyRows": "writer", "RunWriter": "writer", "check_out": "writer", "clean_stale": "writer",
}
__all__ = sorted(_API)
__getattr__, __dir__ = exports(__name__, _API, globals())
