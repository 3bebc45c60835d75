"""Attention weights in a Run: at every step, the weights a decoder's attention module gave its source.

    RUN/attention/{name}/weights.npy   [positions] float32: every step's row, one after another
    RUN/attention/{name}/offsets.npy   [steps + 1] int64: step s's row is weights[offsets[s]:offsets[s + 1]]
    RUN/source/text.txt                every document's source text, concatenated (only when the
    RUN/source/spans.npy               [source steps, 2] int64: each source position's characters   documents
    RUN/source/bounds.npy              [documents + 1, 2] int64: where each document's source     carried a
                                       characters and positions start (the last row: the totals)  ``source``)

Rows are ragged rather than ``[steps, max_source]`` with NaN padding: they are written as the model
runs, before the longest source is known (a source's length is known only once its encoder has run),
and a corpus of short sources with one long one is not padded to the longest. A document's rows,
``AttentionWeights[d]``, are ``[steps, source]`` (NaN past a shorter row's end), a view of the mapped
file when every row of the document has one length. The source positions are the steps of the
encoder's input: with a ``source`` text, each has its characters (``source_tokens``); otherwise they
are indexes. Everything here is checked on ``open_run``: the name's grammar, the shapes, each row's
length against its document's source, and each row being weights (finite, non-negative, summing to 1).
"""
from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from rnnscope.errors import RnnscopeError

from .files import inside, read_bytes, regular_file
from .format import RECORD, check_npy, check_steps
from .keys import attention_dir
from .layout import documents_frame

TOLERANCE = 1e-4        # how far a row's sum may be from 1: softmax in float32 over a few thousand positions
HEADER = 128            # bytes reserved for a 1-D .npy header (numpy pads any 1-D header to 128)
CHECK_ROWS = 1 << 16    # steps checked at a time on open: bounded memory over a long Run


def weights_file(name: str) -> str:
    return f"{attention_dir(name)}/weights.npy"


def offsets_file(name: str) -> str:
    return f"{attention_dir(name)}/offsets.npy"


class FlatRows:
    """A 1-D ``.npy`` file of unknown length, appended to as the model runs; its header is written
    on ``close`` (NumPy's 1-D header always fits the ``HEADER`` bytes reserved for it)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def append(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).ravel()
        os.pwrite(self.fd, data.tobytes(), HEADER + self.count * self.dtype.itemsize)
        self.count += len(data)

    def close(self) -> None:
        if self.fd is None:
            return
        import io
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                    "fortran_order": False, "shape": (self.count,)})
        if len(head.getvalue()) != HEADER:       # never for a 1-D array: said rather than written wrong
            raise RnnscopeError(f"the .npy header of {self.path.name} is {len(head.getvalue())} bytes",
                                "report this: rnnscope reserves 128")
        os.pwrite(self.fd, head.getvalue(), 0)
        os.close(self.fd)
        self.fd = None


class AttentionWriter:
    """``attention/{name}/``'s two files, filled step by step: ``add(rows [steps, source])``."""

    def __init__(self, run_dir: Path, name: str):
        folder = inside(run_dir, attention_dir(name), write=True)
        folder.mkdir(parents=True)
        self.name, self.weights = name, FlatRows(folder / "weights.npy", np.float32)
        self.offsets, self.longest = [0], 0

    def add(self, rows) -> None:
        """One row per step, each ``[source]`` (a list of rows, or an array ``[steps, source]``): one
        write for them all (a pass's steps)."""
        rows = [np.asarray(r, np.float32).ravel() for r in rows]
        if not rows:
            return
        self.weights.append(np.concatenate(rows))
        self.offsets.extend((self.offsets[-1] + np.cumsum([len(r) for r in rows])).tolist())
        self.longest = max(self.longest, max(len(r) for r in rows))

    def finish(self, over: str) -> dict:
        """Close the files; the manifest's entry for this module (``over``: "source" or "positions")."""
        self.weights.close()
        np.save(self.weights.path.with_name("offsets.npy"), np.asarray(self.offsets, np.int64), allow_pickle=False)
        return {"file": weights_file(self.name), "offsets": offsets_file(self.name), "steps": len(self.offsets) - 1,
                "positions": self.offsets[-1], "max_source": self.longest, "over": over}


def write_source(run_dir: Path, texts: list[str], spans: list[np.ndarray]) -> dict:
    """``source/``: each document's source text and its positions' spans ``[positions, 2]`` (in that
    text); returns the manifest's ``source`` entry."""
    folder = inside(run_dir, "source", write=True)
    folder.mkdir()
    data = "".join(texts).encode("utf-8")
    chars = np.cumsum([0] + [len(t) for t in texts])
    steps = np.cumsum([0] + [len(s) for s in spans])
    joined = np.concatenate([np.where(s >= 0, s + c, -1) for s, c in zip(spans, chars)]).astype(np.int64)
    (folder / "text.txt").write_bytes(data)
    np.save(folder / "spans.npy", joined, allow_pickle=False)
    np.save(folder / "bounds.npy", np.stack([chars, steps], 1).astype(np.int64), allow_pickle=False)
    return {"chars": int(chars[-1]), "steps": int(steps[-1]), "sha256": hashlib.sha256(data).hexdigest()}


def _npy(path: Path, name: str, shape: tuple, dtype, mmap: bool = False) -> np.ndarray:
    file = inside(path, name)
    if not file.exists():
        raise RnnscopeError(f"{path} is damaged: {name} is missing", RECORD)
    regular_file(file, "the Run's array", RECORD)
    with open(file, "rb") as f:
        offset = check_npy(f, file, shape, dtype)
        if mmap:
            return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
        f.seek(offset)
        return np.fromfile(f, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class Source:
    """The source texts of a Run whose documents carried one: ``tokens(d)``, each position's text."""

    def __init__(self, path: Path, manifest: dict, documents):
        info, n = manifest["source"], len(documents)
        self.bounds = _npy(path, "source/bounds.npy", (n + 1, 2), np.int64)
        self.spans = _npy(path, "source/spans.npy", (info["steps"], 2), np.int64)
        data = read_bytes(inside(path, "source/text.txt"), "the Run's source text", RECORD, 4 * info["chars"])
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise RnnscopeError(f"{path}/source/text.txt does not match the checksum in the manifest", RECORD)
        try:
            self.text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RnnscopeError(f"{path}/source/text.txt is not UTF-8 ({err.reason} at byte {err.start})",
                                RECORD) from None
        if len(self.text) != info["chars"]:
            raise RnnscopeError(f"{path}/source/text.txt has {len(self.text):,} characters, the manifest says "
                                f"{info['chars']:,}", RECORD)
        frame = documents_frame(list(documents["name"]), self.bounds[:, 0], self.bounds[:, 1])
        check_steps(self.spans, frame, info["chars"], f"{path}/source")

    @classmethod
    def joined(cls, parts: list[Source]) -> Source:
        """The sources of several Runs' documents, one after another (a sharded Run's, each already
        checked): the texts concatenated, the spans and bounds moved by the characters and positions before."""
        out = cls.__new__(cls)
        chars = np.cumsum([0] + [len(p.text) for p in parts])
        steps = np.cumsum([0] + [len(p.spans) for p in parts])
        out.text = "".join(p.text for p in parts)
        out.spans = np.concatenate([np.where(p.spans >= 0, p.spans + c, -1) for p, c in zip(parts, chars)])
        out.bounds = np.concatenate([p.bounds[:-1] + [c, s] for p, c, s in zip(parts, chars, steps)]
                                    + [[[chars[-1], steps[-1]]]]).astype(np.int64)
        return out

    def length(self, d: int) -> int:
        return int(self.bounds[d + 1, 1] - self.bounds[d, 1])

    def tokens(self, d: int) -> list[str]:
        """The text of each source position of document ``d`` ('' for a position without text)."""
        a, b = self.bounds[d, 1], self.bounds[d + 1, 1]
        return [self.text[s:e] if s >= 0 else "" for s, e in self.spans[a:b].tolist()]


class AttentionWeights:
    """One attention module's rows in a Run: ``[d] -> [steps of document d, source]``, ``row(step)``,
    ``lengths [steps]`` (source positions per step), ``flat`` (the mapped file)."""

    def __init__(self, name: str, flat: np.ndarray, offsets: np.ndarray, step_bounds: np.ndarray):
        self.name, self.flat, self.offsets, self.step_bounds = name, flat, offsets, step_bounds

    def __repr__(self) -> str:
        return f"AttentionWeights({self.name}: {len(self.offsets) - 1} steps, up to {self.lengths.max()} source)"

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, step: int) -> np.ndarray:
        """``[source]`` float32: the weights step ``step`` gave each source position."""
        return self.flat[self.offsets[step]:self.offsets[step + 1]]

    def __len__(self) -> int:
        return len(self.step_bounds)

    def __getitem__(self, d: int) -> np.ndarray:
        """``[steps, source]`` float32 of document ``d`` (a view of the mapped file when its rows have
        one length; else a copy, NaN past each shorter row's end)."""
        if not 0 <= d < len(self.step_bounds):
            raise RnnscopeError(f"document {d} is not in this Run's {len(self.step_bounds)}",
                                f"use 0 to {len(self.step_bounds) - 1}")
        a, b = self.step_bounds[d]
        n = self.lengths[a:b]
        if (n == n[0]).all():
            return self.flat[self.offsets[a]:self.offsets[b]].reshape(b - a, int(n[0]))
        out = np.full((b - a, int(n.max())), np.nan, np.float32)
        for i, s in enumerate(range(a, b)):
            out[i, :n[i]] = self.row(s)
        return out


def _bad_rows(flat: np.ndarray, offsets: np.ndarray) -> int | None:
    """The first step whose row is not weights (finite, non-negative, summing to 1), or None. A NaN or
    an Inf makes its row's sum NaN or infinite, so the sums and one sign test check everything."""
    for a in range(0, len(offsets) - 1, CHECK_ROWS):
        b = min(a + CHECK_ROWS, len(offsets) - 1)
        w = flat[offsets[a]:offsets[b]]
        starts = offsets[a:b] - offsets[a]
        bad = ~(np.abs(np.add.reduceat(w, starts, dtype=np.float64) - 1) <= TOLERANCE)
        negative = w < 0
        if negative.any():
            bad[np.searchsorted(starts, np.flatnonzero(negative), "right") - 1] = True
        if bad.any():
            return a + int(np.argmax(bad))
    return None


def open_attention(path: Path, manifest: dict, name: str, step_bounds: np.ndarray,
                   source: Source | None) -> AttentionWeights:
    """``attention/{name}/`` checked against the manifest, its documents and their source."""
    info, steps = manifest["attention"][name], manifest["steps"]
    offsets = _npy(path, offsets_file(name), (steps + 1,), np.int64)
    lengths = np.diff(offsets)
    where = f"{path}/{offsets_file(name)}"
    if offsets[0] != 0 or (lengths < 1).any() or offsets[-1] != info["positions"] \
            or int(lengths.max()) != info["max_source"]:
        raise RnnscopeError(f"{where} does not give each step a row of 1 or more positions adding up to the "
                            f"manifest's {info['positions']:,} (longest {info['max_source']:,})", RECORD)
    flat = _npy(path, weights_file(name), (info["positions"],), np.float32, mmap=True)
    if source is not None:
        want = np.repeat([source.length(d) for d in range(len(step_bounds))], np.diff(step_bounds, axis=1).ravel())
        if (lengths != want).any():
            s = int(np.argmax(lengths != want))
            raise RnnscopeError(f"{where} gives step {s} {lengths[s]} source positions but its document's source "
                                f"has {want[s]}", RECORD)
    bad = _bad_rows(flat, offsets)
    if bad is not None:
        raise RnnscopeError(f"{path}/{weights_file(name)} holds at step {bad} a row that is not attention weights "
                            f"(finite, non-negative, summing to 1 within {TOLERANCE})", RECORD)
    return AttentionWeights(name, flat, offsets, step_bounds)


def merged_entries(manifests: list[dict]) -> dict:
    """The ``attention`` and ``source`` entries of one Run made of the Runs (a sharded Run's shards)
    whose manifests these are, one after another: steps, positions and source counts add, the longest
    row is the longest of any. Every manifest must list the same modules (checked before); the
    source's ``sha256`` is left to the caller, who hashes the texts joined."""
    first = manifests[0]
    if not first.get("attention"):
        return {}
    total = {n: {c: [m["attention"][n][c] for m in manifests] for c in ("steps", "positions", "max_source")}
             for n in first["attention"]}
    out = {"attention": {n: {**info, "steps": sum(total[n]["steps"]), "positions": sum(total[n]["positions"]),
                             "max_source": max(total[n]["max_source"])} for n, info in first["attention"].items()}}
    if first.get("source") is not None:
        out["source"] = {c: sum(m["source"][c] for m in manifests) for c in ("chars", "steps")}
    return out


def attention_kind(m: dict) -> tuple:
    """The attention modules of manifest ``m``, in order, what each is over, and whether a source is kept."""
    return [(n, v.get("over")) for n, v in (m.get("attention") or {}).items()], m.get("source") is None


def check_entries(manifest: dict, merged: dict, source: Source | None, where) -> None:
    """A sharded Run's ``attention`` and ``source`` entries against ``merged``, its shards' added up
    (``merged_entries``; each shard's own files were checked when it opened), and its source's checksum
    against the shards' source texts joined (``source``)."""
    top = {k: manifest[k] for k in ("attention", "source") if manifest.get(k)}
    if "source" in top and merged.get("source") is not None:
        merged["source"]["sha256"] = hashlib.sha256(source.text.encode("utf-8")).hexdigest()
    if merged != top:
        raise RnnscopeError(f"{where}/manifest.json lists attention or source counts its shards do not add up to",
                            RECORD)


def joined_weights(name: str, parts: list[AttentionWeights], flat, step_bounds: np.ndarray) -> AttentionWeights:
    """One module's rows over a sharded Run's shards (``parts``, each checked on open): ``flat`` their
    mapped files one after another (a ``ShardedRows``), the offsets moved onto it. A row, and so a
    document's rows, lie in one shard: ``[d]`` is a view of that shard's file, as in one Run."""
    base = np.cumsum([0] + [len(p.flat) for p in parts])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + b for p, b in zip(parts, base)]).astype(np.int64)
    return AttentionWeights(name, flat, offsets, step_bounds)
