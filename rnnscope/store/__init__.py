"""The Run store: the one place that knows how a Run and its tables lie on disk.

It sits at the bottom of the stack beside ``rnnscope.errors`` and imports only NumPy, pandas,
pyarrow and the standard library: ``probe.record`` streams into a ``RunWriter``, ``open_run``
reads a Run back (checking everything in it first), ``read_table`` / ``write_table`` hold the
analysis tables, and ``atomic_write`` is the single atomic file write (checkpoints use it too).
"""
from .files import atomic_write, inside, regular_file
from .format import DTYPES, FORMAT, FORMAT_VERSION, KEY, check_steps, key_file, split_key
from .run import Run, is_run, open_run
from .tables import DOCUMENTS_SCHEMA, SCHEMAS, read_table, table_path, write_json, write_table
from .writer import NpyRows, RunWriter, check_out, clean_stale, documents_frame, one_document

__all__ = ["DOCUMENTS_SCHEMA", "DTYPES", "FORMAT", "FORMAT_VERSION", "KEY", "NpyRows", "Run", "RunWriter", "SCHEMAS",
           "atomic_write", "check_out", "check_steps", "clean_stale", "documents_frame", "inside", "is_run",
           "key_file", "one_document", "open_run", "read_table", "regular_file", "split_key", "table_path",
           "write_json", "write_table"]
