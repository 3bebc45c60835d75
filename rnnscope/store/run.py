"""The Run: a directory holding one probe's recording, read back memory-mapped.

    RUN/manifest.json        format version, model identity and checksum, encoder, steps, documents, keys, dtype
    RUN/text.txt             every document's text concatenated, stored byte for byte (CR and CRLF kept)
    RUN/spans.npy            [steps, 2] int64: each step's character span [start, end); (-1, -1) = no text
    RUN/ids.npy              [steps] int64: the model's input id at each step
    RUN/times.npy            [steps] float64: a frames Run's time stamp of each step (its steps are input
                             frames, not text: encoder kind "frames", text "", every span (-1, -1), no ids)
    RUN/documents.parquet    one row per document: name, char_start, char_end, step_start, step_end (and
                             ``fields``, its other fields as a JSON object, when it has any)
    RUN/loss.npy             [steps] per-step loss in nats (NaN where none); only when the manifest has a loss
    RUN/document_loss.npy    [documents] float32: a loss that is one scalar per document (loss.per "document")
    RUN/states/{key}.npy     [steps, units] NumPy arrays, opened with mmap_mode='r', never loaded whole
    RUN/attention/{name}/    a decoder's attention weights over its source at every step (``store.attention``)
    RUN/source/              the documents' source texts, when they carried one (``store.attention``)
    RUN/units.parquet        one row per unit: key, index, layer, kind, mean, std, min, max
    RUN/analysis/*.parquet   the tables `rnnscope analyze` writes (see ``tables``)

A Run appears under its final name only once complete (it is written beside it and renamed),
and its manifest says ``complete: true``: an interrupted probe never leaves one that looks done.
A Run may come from someone else, so ``open_run`` checks every file against the manifest
before anything reads it: each failure is one line.

A format 1 Run (one step per character, one document, always a next-character loss) opens as
one: its spans are [i, i + 1], its one document is named "text", it has no ids.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError, first_line

from .docfields import parsed, with_fields
from .files import inside, read_bytes, regular_file
from .format import (DTYPES, FORMAT, RECORD, check_manifest, check_npy, check_steps, check_times, is_frames, key_dtype,
                     key_file)
from .layout import StepLayout
from .tables import DOCUMENTS_SCHEMA, UNITS_SCHEMA, check_schema, footer_rows, read_parquet

MANIFEST_LIMIT = 64 << 20       # a manifest holds names and counts: far below this even for huge models


class Run(StepLayout):
    """``len(run)`` steps; ``run[key] -> [steps, units]`` (memory-mapped); ``run.text`` (``run.chars``
    characters); per step ``run.spans``, ``run.has_text``, ``run.step_document``, ``run.ids``, ``run.loss``;
    ``run.documents``; ``run.per_step(values [chars])``; ``run.tokens(s, e)``; ``run.units``."""

    def __init__(self, path: Path, manifest: dict, text: str | None = None, steps: dict | None = None):
        self.path, self.manifest = Path(path), manifest
        if text is not None:
            self.__dict__["text"] = text
        self.__dict__.update(steps or {})       # spans, documents, ids: already read and checked by open_run

    def __repr__(self) -> str:
        over = "frames (no text)" if self.frames else f"{self.chars} chars"
        return (f"Run({str(self.path)!r}: {len(self)} steps, {over}, {self.manifest['documents']} "
                f"documents, {len(self.keys())} keys, {self.manifest['dtype']}"
                + (f", attention {', '.join(self.attention_names())}" if self.attention_names() else "") + ")")

    def _repr_html_(self) -> str:
        """Jupyter: what the Run holds, every string from it escaped (``rs.show`` draws a unit)."""
        from html import escape
        rows = "".join(f"<tr><td><code>{escape(k)}</code></td><td>{v['units']}</td></tr>"
                       for k, v in list(self.manifest["keys"].items())[:64])
        more = len(self.manifest["keys"]) - 64
        return (f"<p><b>Run</b> <code>{escape(str(self.path))}</code>: {len(self):,} steps over "
                f"{self.chars:,} characters, "
                f"{len(self.keys())} keys, {escape(str(self.manifest['dtype']))}</p>"
                f"<table><tr><th>key</th><th>units</th></tr>{rows}</table>"
                + (f"<p>... and {more} more keys</p>" if more > 0 else "")
                + "<p>Draw a unit with <code>rnnscope.show(run, KEY:INDEX)</code>.</p>")

    def __len__(self) -> int:
        return self.manifest["steps"]

    @property
    def chars(self) -> int:
        return self.manifest["text"]["chars"]

    @cached_property
    def text(self) -> str:
        return _read_text(self.path, self.manifest)

    @cached_property
    def _steps(self) -> dict:
        return _read_steps(self.path, self.manifest)

    @cached_property
    def spans(self) -> np.ndarray:
        """``[steps, 2]`` int64: each step's characters ``text[start:end]``; (-1, -1) for a step without text."""
        return self._steps["spans"]

    @cached_property
    def documents(self) -> pd.DataFrame:
        """One row per document: name, char_start, char_end, step_start, step_end (int64), then a column
        per field the documents were given with (a ``.jsonl`` line's label; None where one lacks it)."""
        return self._steps["documents"]

    @property
    def frames(self) -> bool:
        """Whether the steps are input frames (audio, sensor readings) without text; ``times`` stamps them."""
        return is_frames(self.manifest)

    @cached_property
    def times(self) -> np.ndarray:
        """``[steps]`` float64: a frames Run's time stamps; any other Run's step index within its document."""
        if self._steps.get("times") is not None:
            return self._steps["times"]
        return (np.arange(self.steps) - self.step_bounds[self.step_document, 0]).astype(np.float64)

    @cached_property
    def ids(self) -> np.ndarray | None:
        """``[steps]`` int64: the model's input id at each step (None for a format 1 Run)."""
        return self._steps["ids"]

    def tokens(self, start: int = 0, end: int | None = None) -> list[str]:
        """The text of steps ``start .. end - 1`` ('' for a step without text)."""
        return self.step_tokens(self.text, start, end)

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

    def dask(self, key: str, rows: int = 1 << 16):
        """``run[key]`` as a Dask array, ``rows`` steps a block, read where each task runs."""
        from .shards import dask_array
        return dask_array(self, key, rows)

    @property
    def loss(self) -> np.ndarray | None:
        """``[steps]`` float32 per-step loss in nats (NaN where none), or None when recorded without one."""
        if self.manifest["loss"] is None:
            return None
        return np.load(inside(self.path, "loss.npy"), mmap_mode="r", allow_pickle=False)

    @property
    def document_loss(self) -> np.ndarray | None:
        """``[documents]`` float32: the loss of each document, when the loss was one scalar per document
        (a classifier's); None otherwise (then ``loss`` is per step)."""
        if (self.manifest["loss"] or {}).get("per") != "document":
            return None
        return np.load(inside(self.path, "document_loss.npy"), mmap_mode="r", allow_pickle=False)

    @cached_property
    def units(self) -> pd.DataFrame:
        return read_parquet(inside(self.path, "units.parquet"), UNITS_SCHEMA)

    def attention_names(self) -> list[str]:
        """The attention modules recorded (``record(..., attention=[...])``), by qualified name."""
        return list(self.manifest.get("attention") or {})

    def attention(self, name: str):
        """``name``'s weights (``store.attention.AttentionWeights``): ``[d] -> [steps, source]`` of document
        d, ``row(step) -> [source]``, memory-mapped; checked on ``open_run``."""
        if name not in self.attention_names():
            raise RnnscopeError(f"{self.path} has no attention module {str(name)[:80]!r}",
                                f"use one of {', '.join(self.attention_names())}" if self.attention_names() else
                                "record with attention=[NAME] (rnnscope probe --attention NAME)")
        if name not in self._attention:
            from .attention import open_attention
            self._attention[name] = open_attention(self.path, self.manifest, name, self.step_bounds, self.source)
        return self._attention[name]

    @cached_property
    def _attention(self) -> dict:
        return {}

    @cached_property
    def source(self):
        """The documents' source texts (``store.attention.Source``: ``tokens(d)``), or None when the
        attention's source positions are indexes."""
        if self.manifest.get("source") is None:
            return None
        from .attention import Source
        return Source(self.path, self.manifest, self.documents)

    @cached_property
    def grad_passes(self) -> np.ndarray | None:
        """``[passes, 3]`` int64 of a Run with gradients: each pass's first step, the step after its last,
        and the step after the last loss its gradients include. The gradient at step t of a pass is
        that of the losses of steps t .. reach - 1 alone: the state entering a pass after a document's
        first was carried from the one before detached (truncated BPTT), and the losses past ``reach``
        never reached it. Follows from the manifest's chunk, grad_horizon and carry (None without grad)."""
        if not self.manifest.get("grad") or not _is_int(self.manifest.get("chunk")) or \
                not _is_int(self.manifest.get("grad_horizon")):
            return None
        if getattr(self, "shards", None):        # a sharded Run: each shard chose its own chunk
            parts, at = [], 0
            for shard in self.shards:
                parts.append(shard.grad_passes + at)
                at += len(shard)
            return np.concatenate(parts)
        return grad_passes(self.step_bounds, self.manifest["chunk"], self.manifest["grad_horizon"],
                           bool(self.manifest.get("carry")))

    @property
    def nonfinite(self) -> dict[str, int]:
        """Keys whose recording held NaN or Inf (or overflowed the on-disk dtype): key -> count."""
        return {k: v.get("nonfinite", 0) + v.get("overflow", 0) for k, v in self.manifest["keys"].items()
                if v.get("nonfinite") or v.get("overflow")}

    @property
    def underflow(self) -> dict[str, int]:
        """Keys whose non-zero values became zero or subnormal in their on-disk dtype: key -> count."""
        return {k: v["underflow"] for k, v in self.manifest["keys"].items() if v.get("underflow")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def grad_passes(step_bounds: np.ndarray, chunk: int, horizon: int, carry: bool) -> np.ndarray:
    """``record``'s passes over documents ``step_bounds [documents, 2]``: chunks of ``chunk`` steps
    within each, each run ``horizon`` steps on, to its document's end (a state reset at the next one
    cannot be reached by its losses) or, with ``carry``, the Run's.
    Returns ``[passes, 3]`` int64 (start, end, reach); see ``Run.grad_passes``."""
    total, rows = int(step_bounds[-1, 1]), []
    for a, b in step_bounds.tolist():
        for s in range(a, b, max(chunk, 1)):
            e = min(b, s + chunk)
            rows.append((s, e, min(total if carry else b, e + horizon)))
    return np.asarray(rows, np.int64).reshape(-1, 3)


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


def _read_steps(path: Path, manifest: dict) -> dict:
    """``spans``, ``documents`` and ``ids``, checked against each other and the text (format 1: made up)."""
    chars, steps = manifest["text"]["chars"], manifest["steps"]
    if manifest["format_version"] == 1:
        spans = np.stack([np.arange(chars), np.arange(1, chars + 1)], 1).astype(np.int64)
        docs = pd.DataFrame({"name": ["text"], "char_start": [0], "char_end": [chars], "step_start": [0],
                             "step_end": [chars]}).astype({c: np.int64 for c in DOCUMENTS_SCHEMA if c != "name"})
        return {"spans": spans, "documents": docs, "ids": None}
    spans, ids = _read_npy(path, "spans.npy", (steps, 2), np.int64), None
    if manifest.get("ids", True):
        ids = _read_npy(path, "ids.npy", (steps,), np.int64)
        if (ids < 0).any():
            raise RnnscopeError(f"{path}/ids.npy holds the negative id {int(ids.min())}", RECORD)
    file = inside(path, "documents.parquet")
    regular_file(file, "the Run's document table", RECORD)
    # the manifest's count bounds the rows before any is read: the footer's own, then while reading
    if (declared := footer_rows(file, RECORD)) != manifest["documents"]:
        raise RnnscopeError(f"{file}'s footer declares {declared:,} documents but the manifest says "
                            f"{manifest['documents']:,}", RECORD)
    table = read_parquet(file, DOCUMENTS_SCHEMA, rows=manifest["documents"], fix=RECORD)
    docs = table[list(DOCUMENTS_SCHEMA)]
    if len(docs) != manifest["documents"]:
        raise RnnscopeError(f"{file} has {len(docs):,} documents but the manifest says {manifest['documents']:,}",
                            RECORD)
    check_steps(spans, docs, chars, path, frames=is_frames(manifest))
    docs = docs.astype({c: np.int64 for c in DOCUMENTS_SCHEMA if c != "name"})
    times = None
    if is_frames(manifest):
        times = _read_npy(path, "times.npy", (steps,), np.float64)
        check_times(times, docs[["step_start", "step_end"]].to_numpy(np.int64), f"{path}/times.npy")
    return {"spans": spans, "documents": with_fields(docs, parsed(table, path), str(path)), "ids": ids,
            "times": times}


def _read_npy(path: Path, name: str, shape: tuple, dtype) -> np.ndarray:
    file = inside(path, name)
    regular_file(file, "the Run's array", RECORD)
    with open(file, "rb") as f:
        offset = check_npy(f, file, shape, dtype)
        f.seek(offset)
        return np.fromfile(f, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _check_arrays(path: Path, manifest: dict) -> None:
    steps = manifest["steps"]
    wanted = {"loss.npy": ((steps,), np.float32)} if manifest["loss"] is not None else {}
    if (manifest["loss"] or {}).get("per") == "document":
        wanted["document_loss.npy"] = ((manifest["documents"],), np.float32)
    wanted.update({key_file(k): ((steps, v["units"]), DTYPES[key_dtype(manifest, k)])
                   for k, v in manifest["keys"].items()})
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
                            f"{first_line(err, 80)})", "point at a directory written by `rnnscope probe`") from None
    check_manifest(manifest, path)
    if manifest["format_version"] == 1:
        _from_v1(manifest)
    return manifest


def _from_v1(m: dict) -> None:
    """A format 1 manifest read as format 2 (in memory; the Run on disk is left as it is)."""
    loss = m.get("loss") if isinstance(m.get("loss"), dict) else {}
    mean = loss.get("mean_nats")
    m.update(steps=m["text"]["chars"], documents=1, encoder={"kind": "char", "name": None}, carry=False, ids=False,
             loss={**loss, "kind": "next-token",
                   "mean_nats": mean if isinstance(mean, (int, float)) else float("nan")})


def partials(out: Path) -> re.Pattern:
    """The names a writer of ``out`` leaves beside it: ``.NAME.partial-PID[-XXXX]``, and with ``.old``
    (group 2) the old Run a rename-aside swap moved out of the way (group 1: the writer's PID)."""
    return re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d+)(?:-\w+)?(\.old)?$")


def open_run(path) -> Run:
    """Open a Run written by ``rnnscope.probe.record`` / ``rnnscope probe``, checking every file
    against its manifest first (shapes, dtypes, sizes, the text and its checksum, the spans and
    documents against the text)."""
    path = Path(path)
    if not path.is_dir():
        aside = sorted(p for p in path.parent.iterdir() if (m := partials(path).match(p.name)) and m[2]) \
            if path.parent.is_dir() and not path.is_symlink() else []
        if aside:           # the fallback swap's one instant with no Run under the name
            raise RnnscopeError(f"no run at {path}: a probe killed while replacing it left the old Run at "
                                f"{aside[-1]}", f"the next `rnnscope probe --out {path}` puts it back (or rename "
                                "it back yourself)")
        raise RnnscopeError(f"no run at {path}", "create one with `rnnscope probe CHECKPOINT --text FILE --out RUN`")
    manifest = read_manifest(path)
    if manifest["format_version"] >= 3:
        from .shards import open_sharded        # a Run of document shards (store.shards imports this module)
        return open_sharded(path, manifest)
    text = _read_text(path, manifest)
    _check_arrays(path, manifest)
    steps = _read_steps(path, manifest)
    units = inside(path, "units.parquet")
    regular_file(units, "the Run's unit table", RECORD)
    check_schema(units, UNITS_SCHEMA)
    run = Run(path, manifest, text, steps)
    for name in run.attention_names():        # each checked now, so a hostile Run is refused at open
        run.attention(name)
    return run
