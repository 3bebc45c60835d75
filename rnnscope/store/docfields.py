"""A document's own fields (a ``.jsonl`` line's label, its metadata) in the Run's documents table.

In memory ``run.documents`` has one column per field after its five layout columns (name,
char_start, char_end, step_start, step_end), in the order the fields first appear (typed where
every document has the field, else objects with None where one lacks it). On disk
``documents.parquet`` holds them as one text column ``fields``, each document's fields a JSON
object: any JSON value comes back as it went in, and a table from someone else stays text until it
is parsed here, checked (an object per document, no layout column's name, at most ``MAX_FIELDS``
names). A Run whose documents have no fields has no ``fields`` column.
"""
from __future__ import annotations

import json

import pandas as pd

from rnnscope.errors import RnnscopeError, first_line

from .format import RECORD
from .tables import DOCUMENTS_SCHEMA

LAYOUT = list(DOCUMENTS_SCHEMA)
COLUMN = "fields"
MAX_FIELDS = 1024       # distinct field names: a corpus has a handful; a hostile table could name millions


def with_fields(frame: pd.DataFrame, fields, where: str = "the corpus") -> pd.DataFrame:
    """``frame`` (the layout columns, one row per document) with a column per field of ``fields``
    (one dict per document, or empty: then ``frame`` as it is)."""
    if not fields or not any(fields):
        return frame
    names: dict[str, None] = {}
    for i, row in enumerate(fields):
        for k in row:
            if k in DOCUMENTS_SCHEMA:
                raise RnnscopeError(f"{where}: document {str(frame['name'].iloc[i])[:60]!r} has a field {k!r}, "
                                    "the name of a column of the Run's documents table",
                                    "rename that field in the corpus")
            names.setdefault(k)
    if len(names) > MAX_FIELDS:
        raise RnnscopeError(f"{where}: the documents have {len(names):,} distinct field names, more than "
                            f"{MAX_FIELDS:,}", "keep fewer fields per document")
    extra = pd.DataFrame({k: _column([row.get(k) for row in fields]) for k in names}, index=frame.index)
    return pd.concat([frame, extra], axis=1)


def _column(values: list) -> pd.Series:
    """A field's values: a typed column (int64 labels) where every document has it, else objects, so a
    missing one stays None (pandas would make a missing label NaN and every other one a float)."""
    column = pd.Series(values, dtype=object)
    return column if any(v is None for v in values) else column.infer_objects()


def stored(frame: pd.DataFrame, log=print) -> pd.DataFrame:
    """The documents table as ``documents.parquet`` holds it: the layout columns and, if the documents
    have fields, their JSON objects in ``fields``. A field JSON cannot hold (a tensor) is left out,
    said once."""
    out = frame[LAYOUT].reset_index(drop=True)
    columns = {}
    for k in (c for c in frame.columns if c not in DOCUMENTS_SCHEMA):
        values = frame[k].tolist()          # NumPy scalars become Python numbers
        try:
            json.dumps(values)
        except (TypeError, ValueError) as err:
            log(f"probe: warning: the document field {str(k)[:60]!r} is not JSON ({first_line(err, 60)}); the "
                "Run's documents table leaves it out")
            continue
        columns[str(k)] = values
    if columns:
        out[COLUMN] = [json.dumps({k: v[i] for k, v in columns.items() if v[i] is not None}, ensure_ascii=False)
                       for i in range(len(out))]
    return out


def parsed(table: pd.DataFrame, where) -> list[dict]:
    """Each document's fields (dicts) from a read ``documents.parquet`` (empty when it has none)."""
    if COLUMN not in table:
        return []
    out = []
    for i, text in enumerate(table[COLUMN].tolist()):
        try:
            row = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError) as err:
            raise RnnscopeError(f"{where}/documents.parquet: the fields of document {i} are not JSON "
                                f"({first_line(err, 60)})", RECORD) from None
        if not isinstance(row, dict):
            raise RnnscopeError(f"{where}/documents.parquet: the fields of document {i} are not a JSON object",
                                RECORD)
        out.append(row)
    return out
