"""A sharded Run (format 3): document shards, each a complete format 2 Run, behind one manifest.

    RUN/manifest.json        the Run's own fields (text checksum, steps, documents, keys, model, loss) and
                             ``shards``: per shard, in order, its folder's name, its documents, steps and
                             characters and where they start, and the SHA-256 of its text and its manifest
    RUN/units.parquet        the whole Run's unit summaries, merged exactly from the shards' sums
    RUN/shards/00000/ ...    each a complete Run (manifest, text, spans, ids, documents, loss, states, and
                             a step loop's attention/ and source/, a frames Run's times.npy)
    RUN/analysis/*.parquet   the tables `rnnscope analyze` writes, as in any Run

A shard is written by one task into ``.NNNNN.partial-HOST-PID-TOKEN`` and renamed into place when
whole; a partial is cleared only by a writer on the same host that finds its process gone (a PID
means nothing on another machine), and every partial when the Run is committed. The build folder
``.RUN.shards`` beside the Run keeps finished shards across an interrupted record, so the same
command resumes; the manifest is written last and the folder swapped in as any Run is.

``open_run`` reads a sharded Run as one Run: ``run[key]`` is a ``ShardedRows`` over the shards'
memory maps, spans are offsets into the whole text, ``run.attention(name)`` the shards' rows one
after another (``store.attention.joined_weights``), ``run.source`` and ``run.times`` theirs joined.
Every shard is checked as a Run of its own and against the top manifest's list and fields (its
attention modules, what they are over, frames or text): a missing shard, a link, a lying manifest is
one line; the top manifest's attention and source counts must be its shards' added up.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError

from .attention import Source, attention_kind, check_entries, joined_weights, merged_entries
from .docfields import LAYOUT, parsed, with_fields
from .files import alive, inside, read_bytes, regular_file
from .format import FORMAT, RECORD, SHARDED_VERSION, check_manifest, check_times, is_frames
from .keys import key_file, split_key
from .run import MANIFEST_LIMIT, Run, open_run, read_manifest
from .tables import DOCUMENTS_SCHEMA, UNITS_SCHEMA, check_schema, read_parquet, write_parquet
from .writer import check_out, swap_in

SUMS = ("count", "sum", "sum_sq")       # units.parquet's extra columns in a shard: what merges exactly


class ShardedRows:
    """``[steps, units]``: the rows of several memory-mapped arrays, one after another. Reading rows
    reads only the shards they lie in; ``a[s:e]`` within one shard is that shard's memory map itself.
    ``len``, ``shape``, ``dtype``, ``a[i]``, ``a[s:e]``, ``a[s:e, j]``, ``a[rows]`` (integers or a mask),
    ``np.asarray(a)``; ``a.parts`` and ``a.bounds`` say which rows each shard holds."""

    def __init__(self, parts: list):
        self.parts = parts
        self.bounds = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.bounds[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedRows({list(self.shape)} {self.dtype} over {len(self.parts)} shards)"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return np.asarray(out) if dtype is None else np.asarray(out, dtype)

    def __getitem__(self, index):
        rows, cols = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if rows is Ellipsis:
            rows, cols = slice(None), ()
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {int(rows)} out of range for {len(self)} rows")
            k = int(np.searchsorted(self.bounds, i, "right")) - 1
            return self.parts[k][(i - self.bounds[k],) + cols]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                pieces = [p[(slice(max(start - lo, 0), min(stop, hi) - lo),) + cols]
                          for p, lo, hi in zip(self.parts, self.bounds[:-1], self.bounds[1:])
                          if lo < stop and hi > start]
                if not pieces:
                    return self.parts[0][(slice(0, 0),) + cols]
                return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            rows = np.arange(start, stop, step)
        return self._take(np.asarray(rows), cols)

    def _take(self, rows: np.ndarray, cols: tuple):
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"a mask of {rows.shape} for {len(self)} rows")
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        pointwise = len(cols) == 1 and not isinstance(cols[0], (slice, int, np.integer)) and cols[0] is not None
        if pointwise:       # a[rows, units]: one value per (row, unit) pair, as NumPy pairs two index arrays
            rows, unit = np.broadcast_arrays(rows, np.asarray(cols[0]))
        shard = np.searchsorted(self.bounds, rows, "right") - 1
        out = np.empty(rows.shape + (() if pointwise else self.shape[1:]), self.dtype)
        for k in np.unique(shard):
            at = shard == k
            local = rows[at] - self.bounds[k]
            out[at] = self.parts[k][local, unit[at]] if pointwise else self.parts[k][local]
        return out[(slice(None),) + cols] if cols and not pointwise else out


class ShardedRun(Run):
    """A format 3 Run read as one: ``run.shards`` are its shards, each a Run of its own."""

    def __init__(self, path, manifest, text, steps, shards: list[Run]):
        super().__init__(path, manifest, text, steps)
        self.shards = shards

    def __getitem__(self, key: str) -> ShardedRows:
        if key not in self.manifest["keys"]:
            return super().__getitem__(key)         # the one-line refusal
        return ShardedRows([s[key] for s in self.shards])

    @property
    def loss(self) -> ShardedRows | None:
        return None if self.manifest["loss"] is None else ShardedRows([s.loss for s in self.shards])

    @property
    def document_loss(self) -> np.ndarray | None:
        """``[documents]`` float32: every shard's documents' losses in order (a loss per document)."""
        if (self.manifest["loss"] or {}).get("per") != "document":
            return None
        return np.concatenate([s.document_loss for s in self.shards])

    @cached_property
    def _attention(self) -> dict:
        """Each attention module's rows over every shard's (``store.attention.joined_weights``)."""
        return {n: joined_weights(n, parts := [s.attention(n) for s in self.shards],
                                  ShardedRows([p.flat for p in parts]), self.step_bounds)
                for n in self.attention_names()}

    @cached_property
    def source(self) -> Source | None:
        """Every shard's documents' source texts, one after another (None when the positions are indexes)."""
        return None if self.manifest.get("source") is None else Source.joined([s.source for s in self.shards])


def _shard_folder(path: Path, name: str) -> Path:
    where = path / "shards" / name
    for p in (path / "shards", where):
        if p.is_symlink():
            raise RnnscopeError(f"{p} is a symbolic link; a shard is a folder inside the Run", RECORD)
    inside(path, f"shards/{name}")
    if not where.is_dir():
        raise RnnscopeError(f"{path} is damaged: shard {name} is missing", RECORD)
    return where


def _same(shard: dict, top: dict, where) -> None:
    """A shard must be a format 2 Run of the top manifest's model, keys, dtype and flags."""
    for field in ("dtype", "grad", "ids", "carry"):
        if shard.get(field) != top.get(field):
            raise RnnscopeError(f"{where} has {field} {str(shard.get(field))[:40]!r} but the Run has "
                                f"{str(top.get(field))[:40]!r}", RECORD)
    if {k: v["units"] for k, v in shard["keys"].items()} != {k: v["units"] for k, v in top["keys"].items()}:
        raise RnnscopeError(f"{where} holds other state keys or units than the Run's manifest lists", RECORD)
    if shard["model"]["checksum"] != top["model"]["checksum"] or _loss_kind(shard) != _loss_kind(top):
        raise RnnscopeError(f"{where} was recorded from another model or loss than the Run", RECORD)
    if is_frames(shard) != is_frames(top):
        what = {True: "a Run of frames", False: "a Run of text"}
        raise RnnscopeError(f"{where} is {what[is_frames(shard)]} but the Run is {what[is_frames(top)]}", RECORD)
    if attention_kind(shard) != attention_kind(top):
        raise RnnscopeError(f"{where} holds attention of other modules or over another source than the Run's "
                            "manifest lists", RECORD)


def _loss_kind(m: dict):
    return None if m["loss"] is None else (m["loss"].get("kind"), m["loss"].get("per", "step"))


def open_sharded(path: Path, manifest: dict) -> ShardedRun:
    """Open every shard (each checked as a Run), check it against its entry, and join them."""
    shards, texts, spans, ids, docs, fields, manifests = [], [], [], [], [], [], []
    for entry in manifest["shards"]:
        name = entry["name"]
        where = _shard_folder(path, name)
        data = read_bytes(inside(where, "manifest.json"), "the shard's manifest", RECORD, MANIFEST_LIMIT)
        if hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]:
            raise RnnscopeError(f"{where}/manifest.json does not match the checksum {path}/manifest.json lists", RECORD)
        sm = read_manifest(where)
        if sm["format_version"] != 2:
            raise RnnscopeError(f"{where} has run format {sm['format_version']}; a shard is a format 2 Run", RECORD)
        for field, got in (("documents", sm["documents"]), ("steps", sm["steps"]), ("chars", sm["text"]["chars"]),
                           ("text_sha256", sm["text"]["sha256"])):
            if got != entry[field]:
                raise RnnscopeError(f"{where}/manifest.json says {field} {got} but {path}/manifest.json lists "
                                    f"{entry[field]}", RECORD)
        _same(sm, manifest, where)
        manifests.append(sm)
        run = open_run(where)
        shards.append(run)
        texts.append(run.text)
        spans.append(np.where(run.spans >= 0, run.spans + entry["char_start"], -1))
        ids.append(run.ids)
        d = run.documents[LAYOUT].copy()
        d[["char_start", "char_end"]] += entry["char_start"]
        d[["step_start", "step_end"]] += entry["step_start"]
        docs.append(d)
        # each document's fields as stored: joined first, then made columns as one process makes them
        fields += parsed(read_parquet(inside(where, "documents.parquet"), DOCUMENTS_SCHEMA), where) or [{}] * len(d)
    text = "".join(texts)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != manifest["text"]["sha256"]:
        raise RnnscopeError(f"{path}: the shards' text does not match the checksum in the manifest", RECORD)
    units = inside(path, "units.parquet")
    regular_file(units, "the Run's unit table", RECORD)
    check_schema(units, UNITS_SCHEMA)
    steps = {"spans": np.concatenate(spans), "documents": with_fields(pd.concat(docs, ignore_index=True), fields,
                                                                      str(path)),
             "ids": None if ids[0] is None else np.concatenate(ids)}
    if is_frames(manifest):        # each shard's checked on its open; the joined ones once more, as one Run's
        steps["times"] = np.concatenate([s.times for s in shards])
        check_times(steps["times"], steps["documents"][["step_start", "step_end"]].to_numpy(np.int64),
                    f"{path}: the shards' times.npy")
    run = ShardedRun(path, manifest, text, steps, shards)
    check_entries(run.manifest, merged_entries(manifests), run.source, run.path)
    return run


# --- writing ---------------------------------------------------------------------------------------------------

def shard_name(index: int) -> str:
    return f"{index:05d}"


_PARTIAL = re.compile(r"^\.(?P<name>[0-9]{5,9})\.partial-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-\w+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:60] or "host"


def clean_partials(shards: Path, everyone: bool = False) -> list[str]:
    """Remove shard partials whose writer is gone: on this host, a process no longer alive. A partial
    from another host is left to its own host (or to the commit, ``everyone``, once no task runs)."""
    gone = []
    for p in sorted(shards.iterdir()) if shards.is_dir() else []:
        m = _PARTIAL.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and (
                everyone or (m["host"] == _host() and int(m["pid"]) != os.getpid() and not alive(int(m["pid"])))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def finished_shard(folder: Path, expect: dict) -> dict | None:
    """The entry of the shard at ``folder`` if it is a complete Run of the text (its SHA-256) and model
    checksum ``expect`` holds, else None; a wrong or damaged one is removed so it is written again."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    try:
        run = open_run(folder)
    except RnnscopeError:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    m = run.manifest
    if (m["format_version"] != 2 or m["text"]["sha256"] != expect["text_sha256"]
            or m["model"]["checksum"] != expect["model_checksum"] or run.documents["name"].tolist() != expect["names"]):
        shutil.rmtree(folder, ignore_errors=True)
        return None
    data = (folder / "manifest.json").read_bytes()
    return {"name": folder.name, "documents": m["documents"], "steps": m["steps"], "chars": m["text"]["chars"],
            "text_sha256": m["text"]["sha256"], "manifest_sha256": hashlib.sha256(data).hexdigest()}


def write_shard(build: Path, index: int, expect: dict, write) -> dict:
    """Shard ``index`` of the Run built in ``build``: ``write(path)`` writes a complete format 2 Run at
    ``path`` inside a partial named for this host, process and a random token, renamed into place
    whole. Idempotent: a shard already there and right is kept (a task run twice writes it once)."""
    shards = build / "shards"
    final = shards / shard_name(index)
    done = finished_shard(final, expect)
    if done:
        return done
    clean_partials(shards)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{_host()}-{os.getpid()}-", dir=shards))
    try:
        write(stage / "run")
        try:
            os.rename(stage / "run", final)
        except OSError:
            if not final.is_dir():          # else another copy of this task was first: its shard stands
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    done = finished_shard(final, expect)
    if done is None:
        raise RnnscopeError(f"shard {final.name} was written but does not hold the planned documents",
                            "run the command again")
    return done


class ShardBuild:
    """The folder ``.NAME.shards`` beside the Run ``out`` that its shards are written into; it lasts
    across an interrupted record (``plan.json`` says what it is for: a different plan starts afresh)."""

    def __init__(self, out, plan: dict, *, overwrite: bool = False, log=print):
        self.out, self.overwrite, self.log = check_out(out, overwrite), overwrite, log
        self.dir = self.out.parent / f".{self.out.name}.shards"
        self.fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
        planned = self.dir / "plan.json"
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise RnnscopeError(f"{self.dir} is in the way of the Run's shards (a link or a file)",
                                "move it away, or choose another --out")
        try:
            same = json.loads(planned.read_text())["fingerprint"] == self.fingerprint
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if self.dir.exists() and not same:
            shutil.rmtree(self.dir)
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        planned.write_text(json.dumps({"fingerprint": self.fingerprint}))

    def reusable(self, index: int, expect: dict) -> dict | None:
        return finished_shard(self.dir / "shards" / shard_name(index), expect)

    def commit(self, entries: list[dict], fields: dict) -> Path:
        """Merge the shards' manifests and unit tables, write the manifest last, and swap the Run in."""
        clean_partials(self.dir / "shards", everyone=True)
        shards = [read_manifest(self.dir / "shards" / e["name"]) for e in entries]
        first, at = shards[0], {"doc_start": 0, "step_start": 0, "char_start": 0}
        listing, digest = [], hashlib.sha256()
        for e, m in zip(entries, shards):
            _same(m, first, self.dir / "shards" / e["name"])
            listing.append({**e, **at})
            at = {"doc_start": at["doc_start"] + e["documents"], "step_start": at["step_start"] + e["steps"],
                  "char_start": at["char_start"] + e["chars"]}
            digest.update((self.dir / "shards" / e["name"] / "text.txt").read_bytes())
        keys = {k: {"units": v["units"], "file": key_file(k), "dtype": v.get("dtype", first["dtype"]),
                    **{c: sum(m["keys"][k].get(c, 0) for m in shards) for c in ("nonfinite", "overflow", "underflow")}}
                for k, v in first["keys"].items()}          # a key's own dtype: gradients are float32
        manifest = {**first, **fields, "format": FORMAT, "format_version": SHARDED_VERSION, "complete": True,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "text": {"chars": at["char_start"], "sha256": digest.hexdigest(), "newlines": "as stored"},
                    "steps": at["step_start"], "documents": at["doc_start"], "keys": keys,
                    "nonfinite": any(v["nonfinite"] or v["overflow"] for v in keys.values()),
                    "loss": self._loss(first["loss"], entries), "shards": listing,
                    **self._attention(shards, entries)}
        check_manifest(manifest, self.dir)
        write_parquet(self.dir / "units.parquet", merge_units([read_parquet(self.dir / "shards" / e["name"] /
                                                                            "units.parquet", UNITS_SCHEMA)
                                                               for e in entries]), UNITS_SCHEMA, "units")
        (self.dir / "plan.json").unlink(missing_ok=True)
        (self.dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        swap_in(self.dir, self.out, self.overwrite)
        return self.out

    def _attention(self, shards: list[dict], entries: list[dict]) -> dict:
        """The Run's ``attention`` and ``source`` from its shards', the source's checksum over their texts."""
        merged = merged_entries(shards)
        if "source" in merged:
            digest = hashlib.sha256()
            for e in entries:
                digest.update((self.dir / "shards" / e["name"] / "source" / "text.txt").read_bytes())
            merged["source"]["sha256"] = digest.hexdigest()
        return merged

    def _loss(self, loss: dict | None, entries: list[dict]) -> dict | None:
        """The mean over every step (or document, for a loss per document) of the whole Run, as one
        process computes it (4 bytes a step read)."""
        if loss is None:
            return None
        per = loss.get("per", "step")
        name = "document_loss.npy" if per == "document" else "loss.npy"
        # float64, as one process's mean of its documents' losses (floats) or of its float32 loss.npy
        values = np.concatenate([np.load(self.dir / "shards" / e["name"] / name, allow_pickle=False)
                                 for e in entries]).astype(np.float64 if per == "document" else np.float32)
        with np.errstate(all="ignore"):
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return {**loss, "mean_nats": mean, f"bits_per_{per}": mean / np.log(2)}


def merge_units(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The unit table of the whole Run from its shards': counts, sums and sums of squares add, min and
    max take the extremes (exact up to the order of float64 additions); NaN where no value was finite."""
    first = frames[0]
    if not all(c in first for c in SUMS):
        raise RnnscopeError("a shard's units.parquet lacks its sums (count, sum, sum_sq)", RECORD)
    n, s, ss = (sum(f[c].to_numpy(np.float64) for f in frames) for c in SUMS)
    lo = np.fmin.reduce([f["min"].to_numpy(np.float64) for f in frames])
    hi = np.fmax.reduce([f["max"].to_numpy(np.float64) for f in frames])
    seen = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, s / n, np.nan)
        var = np.maximum(ss / n - mean ** 2, 0)
    out = first[["unit", "key", "index", "module", "layer", "reverse", "kind"]].copy()
    out = out.assign(mean=mean, std=np.where(seen, np.sqrt(var), np.nan), min=np.where(seen, lo, np.nan),
                     max=np.where(seen, hi, np.nan), count=n, sum=s, sum_sq=ss)
    out["key"].map(split_key)           # every key is a key (the table came from someone's shards)
    return out


class _RowsOnDisk:
    """One ``.npy`` file's rows, memory-mapped where they are read (on a worker): a Dask graph then
    carries the file's path, never its data."""

    def __init__(self, file: str, shape: tuple, dtype):
        self.file, self.shape, self.dtype, self.ndim = file, tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, index):
        return np.asarray(np.load(self.file, mmap_mode="r", allow_pickle=False)[index])


def dask_array(run: Run, key: str, rows: int = 1 << 16):
    """``run[key]`` as a Dask array ``[steps, units]`` in blocks of ``rows`` steps, each read from its
    shard's file where the task runs (workers must see the Run's folder)."""
    import dask.array as da
    a = run[key]
    parts = a.parts if isinstance(a, ShardedRows) else [a]
    return da.concatenate([da.from_array(_RowsOnDisk(str(p.filename), p.shape, p.dtype), chunks=(rows, -1),
                                         name=False) for p in parts])
