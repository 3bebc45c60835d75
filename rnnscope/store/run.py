"""The Run: a directory holding one probe's recording, read back memory-mapped.

    RUN/manifest.json        format version, model identity and checksum, vocabulary, keys, dtype, flags
    RUN/text.txt             the text, one timestep per character, stored byte for byte (CR and CRLF kept)
    RUN/loss.npy             [time] next-character loss in nats (NaN where there is no next character)
    RUN/states/{key}.npy     [time, units] NumPy arrays, opened with mmap_mode='r', never loaded whole
    RUN/units.parquet        one row per unit: key, index, layer, kind, mean, std, min, max
    RUN/analysis/*.parquet   the tables `rnnscope analyze` writes (see ``tables``)

A Run appears under its final name only once complete (it is written beside it and renamed),
and its manifest says ``complete: true``: an interrupted probe never leaves one that looks done.
A Run may come from someone else, so ``open_run`` checks every file against the manifest
before anything reads it: each failure is one line.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError

from .files import inside, read_bytes, regular_file
from .format import DTYPES, FORMAT, RECORD, check_manifest, check_npy, key_file
from .tables import UNITS_SCHEMA, check_schema, read_parquet

MANIFEST_LIMIT = 64 << 20       # a manifest holds names and counts: far below this even for huge models


class Run:
    """``run.text``, ``run.keys()``, ``run[key] -> [time, units]`` (memory-mapped), ``run.loss``, ``run.units``."""

    def __init__(self, path: Path, manifest: dict, text: str | None = None):
        self.path, self.manifest = Path(path), manifest
        if text is not None:
            self.__dict__["text"] = text

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {len(self)} chars, {len(self.keys())} keys, {self.manifest['dtype']})"

    def _repr_html_(self) -> str:
        """Jupyter: what the Run holds, every string from it escaped (``rs.show`` draws a unit)."""
        from html import escape
        rows = "".join(f"<tr><td><code>{escape(k)}</code></td><td>{v['units']}</td></tr>"
                       for k, v in list(self.manifest["keys"].items())[:64])
        more = len(self.manifest["keys"]) - 64
        return (f"<p><b>Run</b> <code>{escape(str(self.path))}</code>: {len(self):,} characters, "
                f"{len(self.keys())} keys, {escape(str(self.manifest['dtype']))}</p>"
                f"<table><tr><th>key</th><th>units</th></tr>{rows}</table>"
                + (f"<p>... and {more} more keys</p>" if more > 0 else "")
                + "<p>Draw a unit with <code>rnnscope.show(run, KEY:INDEX)</code>.</p>")

    def __len__(self) -> int:
        return self.manifest["text"]["chars"]

    @cached_property
    def text(self) -> str:
        return _read_text(self.path, self.manifest)

    def keys(self) -> list[str]:
        return list(self.manifest["keys"])

    def __contains__(self, key: str) -> bool:
        return key in self.manifest["keys"]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.manifest["keys"]:
            hint = "record with --grad" if str(key).split(".")[-1].startswith("grad_") else "check run.keys()"
            raise RnnscopeError(f"{self.path} has no key {str(key)[:80]!r} (it has {', '.join(self.keys()[:6])}, ...)",
                                hint)
        return np.load(inside(self.path, key_file(key)), mmap_mode="r", allow_pickle=False)

    @property
    def loss(self) -> np.ndarray:
        return np.load(inside(self.path, "loss.npy"), mmap_mode="r", allow_pickle=False)

    @cached_property
    def units(self) -> pd.DataFrame:
        return read_parquet(inside(self.path, "units.parquet"), UNITS_SCHEMA)

    @property
    def nonfinite(self) -> dict[str, int]:
        """Keys whose recording held NaN or Inf (or overflowed the on-disk dtype): key -> count."""
        return {k: v.get("nonfinite", 0) + v.get("overflow", 0) for k, v in self.manifest["keys"].items()
                if v.get("nonfinite") or v.get("overflow")}


def _read_text(path: Path, manifest: dict) -> str:
    """``text.txt`` as stored (bytes decoded, no newline translation), checked against the manifest."""
    file = inside(path, "text.txt")
    chars = manifest["text"]["chars"]
    data = read_bytes(file, "the Run's text", RECORD, 4 * chars)      # UTF-8: at most 4 bytes a character
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RnnscopeError(f"{file} is not UTF-8 ({err.reason} at byte {err.start})", RECORD) from None
    if len(text) != chars:
        raise RnnscopeError(f"{file} has {len(text):,} characters but the manifest says {chars:,}", RECORD)
    if hashlib.sha256(data).hexdigest() != manifest["text"]["sha256"]:
        raise RnnscopeError(f"{file} does not match the checksum in the manifest", RECORD)
    return text


def _check_arrays(path: Path, manifest: dict) -> None:
    chars, dtype = manifest["text"]["chars"], DTYPES[manifest["dtype"]]
    wanted = {"loss.npy": ((chars,), np.float32)}
    wanted.update({key_file(k): ((chars, v["units"]), dtype) for k, v in manifest["keys"].items()})
    for name, (shape, dt) in wanted.items():
        file = inside(path, name)
        if not file.exists():
            raise RnnscopeError(f"{path} is damaged: {name} is missing", "run `rnnscope probe` again")
        regular_file(file, "the Run's array", RECORD)
        with open(file, "rb") as f:
            check_npy(f, file, shape, dt)


def is_run(path: Path) -> bool:
    """Whether the directory ``path`` has a manifest saying it is a Run (complete, damaged or not)."""
    try:
        data = read_bytes(inside(path, "manifest.json"), "the Run's manifest", RECORD, MANIFEST_LIMIT)
        manifest = json.loads(data.decode("utf-8"))
    except (RnnscopeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def read_manifest(path: Path) -> dict:
    """The manifest of the directory ``path``, checked; refused with one line if it is not a Run's."""
    file = inside(path, "manifest.json")
    if not file.exists():
        raise RnnscopeError(f"{path} is not an rnnscope run (no manifest.json)",
                            "point at a directory written by `rnnscope probe`")
    data = read_bytes(file, "the Run's manifest", RECORD, MANIFEST_LIMIT)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RnnscopeError(f"{file} is not UTF-8 ({err.reason} at byte {err.start})", RECORD) from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise RnnscopeError(f"{path} is not an rnnscope run (manifest.json is not JSON: "
                            f"{str(err).splitlines()[0][:80]})", "point at a directory written by `rnnscope probe`") from None
    check_manifest(manifest, path)
    return manifest


def open_run(path) -> Run:
    """Open a Run written by ``rnnscope.probe.record`` / ``rnnscope probe``, checking every file
    against its manifest first (shapes, dtypes, sizes, the text and its checksum)."""
    path = Path(path)
    if not path.is_dir():
        raise RnnscopeError(f"no run at {path}", "create one with `rnnscope probe CHECKPOINT --text FILE --out RUN`")
    manifest = read_manifest(path)
    text = _read_text(path, manifest)
    _check_arrays(path, manifest)
    units = inside(path, "units.parquet")
    regular_file(units, "the Run's unit table", RECORD)
    check_schema(units, UNITS_SCHEMA)
    return Run(path, manifest, text)
