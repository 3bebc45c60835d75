"""The Run's on-disk format: the manifest's fields and types, state keys, and ``.npy`` headers.

The same checks run when a Run is written and when it is opened, so rnnscope never writes a Run
it would refuse to read. Each failure is one line naming the file and what is wrong with it.
"""
from __future__ import annotations

import math
import re

import numpy as np

from rnnscope.errors import RnnscopeError, first_line

from .keys import KEY, MODULE, UNIT, key_file

FORMAT, FORMAT_VERSION = "rnnscope-run", 2
SHARDED_VERSION = 3             # a Run of document shards, each a format 2 Run (``store.shards``)
SHARD_NAME = re.compile(r"^[0-9]{5,9}$")
DTYPES = {"float16": np.float16, "float32": np.float32}
RECORD = "record it again with `rnnscope probe`"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(m, where) -> None:
    """Refuse a manifest whose fields are missing or of the wrong type, before anything uses them."""
    def bad(problem):
        raise RnnscopeError(f"{where}/manifest.json {problem}", RECORD)
    if not isinstance(m, dict):
        raise RnnscopeError(f"{where} is not an rnnscope run (manifest.json is not a JSON object)",
                            "point at a directory written by `rnnscope probe`")
    if m.get("format") != FORMAT:
        raise RnnscopeError(f"{where} is not an rnnscope run (manifest.json has no format {FORMAT!r})",
                            "point at a directory written by `rnnscope probe`")
    version = m.get("format_version")
    if not _is_int(version) or version < 1:
        bad(f"has no valid format_version (got {str(version)[:40]!r})")
    if version > SHARDED_VERSION:
        raise RnnscopeError(f"{where} has run format {version}, newer than this rnnscope reads ({SHARDED_VERSION})",
                            "upgrade rnnscope")
    if m.get("complete") is not True:
        raise RnnscopeError(f"{where} is an incomplete run (the probe was interrupted)", "run `rnnscope probe` again")
    text, least = m.get("text"), 0 if is_frames(m) else 1        # a frames Run's steps read no text
    if not isinstance(text, dict) or not _is_int(text.get("chars")) or text["chars"] < least:
        bad(f"lacks text.chars, a whole number of characters >= {least}")
    if not isinstance(text.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", text["sha256"]):
        bad("lacks text.sha256, the checksum of text.txt")
    if m.get("dtype") not in DTYPES:
        bad(f"has dtype {str(m.get('dtype'))[:40]!r}, not one of {', '.join(DTYPES)}")
    keys = m.get("keys")
    if not isinstance(keys, dict) or not keys:
        bad("lacks keys, an object of state keys")
    for key, info in keys.items():
        if not KEY.match(key):
            bad(f"has key {key[:80]!r}, which is not a state key like 'rnn.l0.c'")
        if (not isinstance(info, dict) or not _is_int(info.get("units")) or info["units"] < 1
                or info.get("file", key_file(key)) != key_file(key)
                or info.get("dtype", m.get("dtype")) not in DTYPES
                or not all(_is_int(info.get(c, 0)) and info.get(c, 0) >= 0
                           for c in ("nonfinite", "overflow", "underflow"))):
            bad(f"has a malformed entry for key {key!r} (units, file, dtype, nonfinite, overflow, underflow)")
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("checksum"), str):
        bad("lacks model.checksum")
    modules = model.get("modules", {})
    if (not all(isinstance(model.get(f), (str, type(None))) for f in ("source", "card_name", "weights_sha256", "corpus"))
            or not isinstance(modules, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("type"), str) for v in modules.values())):
        bad("has a malformed model.source, card_name, weights_sha256, corpus or modules")
    for field in ("vocab", "unk"):
        if not isinstance(m.get(field), (str, type(None))):
            bad(f"has a {field} that is not a string")
    if not isinstance(m.get("grad", False), bool):
        bad("has a grad flag that is not true or false")
    if version >= 2:
        _check_v2(m, bad)
    if version >= 3:
        _check_shards(m, bad)
    if version >= 2 and (m.get("attention") or m.get("source") is not None):
        _check_attention(m, bad)
    if "generated" in m:
        _check_generated(m["generated"], bad)


def _check_generated(g, bad) -> None:
    """``generated`` (a Run that ``rnnscope generate --out`` wrote): the prime, the clamps by unit, the
    seeds, the temperature and the characters sampled per seed."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if (not isinstance(g, dict) or not isinstance(g.get("prime"), str) or not isinstance(g.get("clamps"), dict)
            or not all(isinstance(u, str) and UNIT.match(u) and number(v) for u, v in g["clamps"].items())
            or not isinstance(g.get("seeds"), list) or not g["seeds"]
            or not all(_is_int(s) and s >= 0 for s in g["seeds"])
            or not number(g.get("temperature")) or g["temperature"] < 0
            or not _is_int(g.get("length")) or g["length"] < 1):
        bad("has a malformed generated (prime, clamps of unit to number, seeds, temperature, length)")


def key_dtype(manifest: dict, key: str) -> str:
    """The dtype ``states/{key}.npy`` is stored in: the key's own (gradients are float32 by default, since
    float16 zeroes small ones), else the Run's (a Run written before keys had their own)."""
    return manifest["keys"][key].get("dtype", manifest["dtype"])


ENCODER_KINDS, LOSS_KINDS = ("char", "spans", "frames"), ("next-token", "user")


def is_frames(m: dict) -> bool:
    """Whether the manifest ``m`` is a frames Run's: steps over input frames (audio, sensor readings), no text."""
    return isinstance(m, dict) and isinstance(m.get("encoder"), dict) and m["encoder"].get("kind") == "frames"


def _check_v2(m: dict, bad) -> None:
    """The fields format 2 added: how steps map to text, the encoder, the documents, the loss."""
    chars, steps, docs = m["text"]["chars"], m.get("steps"), m.get("documents")
    if not _is_int(steps) or steps < 1:
        bad(f"has no valid steps, a whole number >= 1 (got {str(steps)[:40]!r})")
    if not _is_int(docs) or not 1 <= docs <= (steps if is_frames(m) else min(steps, chars)):
        bad(f"has documents {str(docs)[:40]!r}, not a whole number from 1 to the steps and characters")
    if is_frames(m) and (chars != 0 or m.get("ids", True)):
        bad("is a frames Run with text or ids (its steps are frames: no characters, no ids)")
    enc = m.get("encoder")
    if (not isinstance(enc, dict) or enc.get("kind") not in ENCODER_KINDS
            or not isinstance(enc.get("name"), (str, type(None)))):
        bad(f"has a malformed encoder (a kind among {', '.join(ENCODER_KINDS)} and a name)")
    for flag in ("carry", "ids"):
        if not isinstance(m.get(flag, True), bool):
            bad(f"has a {flag} flag that is not true or false")
    loss = m.get("loss")
    if loss is not None and (not isinstance(loss, dict) or loss.get("kind") not in LOSS_KINDS
                             or not isinstance(loss.get("mean_nats"), (int, float))
                             or isinstance(loss.get("mean_nats"), bool)
                             or loss.get("per", "step") not in ("step", "document")):
        bad(f"has a malformed loss (null, or a kind among {', '.join(LOSS_KINDS)}, mean_nats and per step "
            "or document)")


def _check_attention(m: dict, bad) -> None:
    """``attention``: per module name (the grammar of a key's module: never a path) its two files at their
    own names, its steps (the Run's), positions and longest row; ``source``: a source text's counts."""
    att, src = m.get("attention") or {}, m.get("source")
    if not isinstance(att, dict):
        bad("has an attention that is not an object of module names")
    for name, info in att.items():
        if not name or not MODULE.match(name):
            bad(f"has attention {name[:80]!r}, which is not a module name like 'decoder.attn'")
        if (not isinstance(info, dict) or info.get("file") != f"attention/{name}/weights.npy"
                or info.get("offsets") != f"attention/{name}/offsets.npy" or info.get("steps") != m["steps"]
                or not all(_is_int(info.get(c)) and info[c] >= 1 for c in ("positions", "max_source"))
                or info.get("over") not in ("source", "positions") or (info["over"] == "source") != (src is not None)):
            bad(f"has a malformed attention entry for {name!r} (file, offsets, steps, positions, max_source, over)")
    if src is not None and (not isinstance(src, dict) or not all(_is_int(src.get(c)) and src[c] >= 1
                                                                  for c in ("chars", "steps"))
                            or not isinstance(src.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", src["sha256"])):
        bad("has a malformed source (chars, steps, sha256 of source/text.txt)")


_SHARD_COUNTS = (("doc_start", "documents"), ("step_start", "steps"), ("char_start", "chars"))


def _check_shards(m: dict, bad) -> None:
    """Format 3's shard list: each entry a shard folder's name, its documents, steps and characters
    and where they start, and the SHA-256 of its text and its manifest; together they tile the Run
    in order, none listed twice, none overlapping another."""
    shards, seen = m.get("shards"), set()
    if not isinstance(shards, list) or not shards:
        bad("lacks shards, a list of the Run's document shards")
    at = dict.fromkeys(("doc_start", "step_start", "char_start"), 0)
    least = {"documents": 1, "steps": 1, "chars": 0 if is_frames(m) else 1}     # a frames shard reads no text
    for i, s in enumerate(shards):
        if (not isinstance(s, dict) or not isinstance(s.get("name"), str) or not SHARD_NAME.match(s["name"])
                or not all(_is_int(s.get(a)) and s[a] >= 0 and _is_int(s.get(n)) and s[n] >= least[n]
                           for a, n in _SHARD_COUNTS)
                or not all(isinstance(s.get(h), str) and re.fullmatch(r"[0-9a-f]{64}", s[h])
                           for h in ("text_sha256", "manifest_sha256"))):
            bad(f"has a malformed shard entry {i} (name, documents, steps, chars, their starts, checksums)")
        if s["name"] in seen:
            bad(f"lists shard {s['name']} twice")
        seen.add(s["name"])
        for start, count in _SHARD_COUNTS:
            if s[start] != at[start]:
                how = "overlaps the shard before it" if s[start] < at[start] else "leaves a gap after the shard before it"
                bad(f"has shard {s['name']} starting at {count} {s[start]:,}, where the one before ends at "
                    f"{at[start]:,}: it {how}")
            at[start] += s[count]
    if (at["doc_start"], at["step_start"], at["char_start"]) != (m["documents"], m["steps"], m["text"]["chars"]):
        bad("has shards whose documents, steps and characters do not add up to the Run's")


def check_steps(spans: np.ndarray, documents, chars: int, where, frames: bool = False) -> None:
    """How steps map to text, checked: ``spans [S, 2]`` int64 character spans ((-1, -1): no text) and the
    ``documents`` frame (name, char_start, char_end, step_start, step_end) tiling steps and characters
    in order. Within a document, text steps lie inside its characters and their starts and ends never
    go back (equal spans are allowed: a byte-level model gives several steps one character).
    ``frames``: the steps are input frames, so no step reads text and every document is empty of it."""
    def bad(problem):
        raise RnnscopeError(f"{where} {problem}", RECORD)
    spans = np.asarray(spans)
    if spans.dtype != np.int64 or spans.ndim != 2 or spans.shape[1] != 2 or len(spans) < 1:
        bad(f"has spans of {spans.dtype} {list(spans.shape)}, expected int64 [steps, 2]")
    start, end = spans[:, 0], spans[:, 1]
    text = start >= 0
    for problem, rows in (("a step without text must have span (-1, -1)", ~text & ((start != -1) | (end != -1))),
                          (f"a span must lie inside the text's {chars:,} characters", text & (end > chars)),
                          ("a text step's span must have start < end", text & (start >= end))):
        if rows.any():
            i = int(np.argmax(rows))
            bad(f"has span ({start[i]}, {end[i]}) at step {i}: {problem}")
    cols = ("char_start", "char_end", "step_start", "step_end")
    for col in ("name", *cols):
        if col not in documents:
            bad(f"has documents without the column {col!r}")
    if not all(_int_column(documents[c]) for c in cols) or not all(isinstance(n, str) for n in documents["name"]):
        bad("has documents whose names are not text or whose bounds are not integers")
    if len(documents) < 1:
        bad("has no documents")
    b = {c: np.asarray(documents[c], np.int64) for c in cols}
    if frames:
        if text.any() or chars != 0 or b["char_start"].any() or b["char_end"].any():
            bad("is a frames Run with characters (its spans must all be (-1, -1), its documents' characters 0)")
        _tiles(b["step_start"], b["step_end"], len(spans), "steps", bad)
        return
    for lo, hi, total, what in (("char_start", "char_end", chars, "characters"), ("step_start", "step_end",
                                                                                  len(spans), "steps")):
        _tiles(b[lo], b[hi], total, what, bad)
    if len(spans) == chars and np.array_equal(b["char_start"], b["step_start"]) and start[0] == 0 \
            and (np.diff(start) == 1).all() and (end - start == 1).all():
        return          # one step per character, documents bounded alike: every check below holds (0.8 s at 10M)
    doc = np.repeat(np.arange(len(documents)), b["step_end"] - b["step_start"])
    outside = text & ((start < b["char_start"][doc]) | (end > b["char_end"][doc]))
    if outside.any():
        i = int(np.argmax(outside))
        bad(f"has span ({start[i]}, {end[i]}) at step {i} outside its document's characters "
            f"[{b['char_start'][doc[i]]}, {b['char_end'][doc[i]]})")
    covered = np.bincount(doc[text], minlength=len(documents))     # a document no step reads is empty to the model
    if (covered == 0).any():
        i = int(np.argmin(covered))
        bad(f"has document {i} ({str(documents['name'].iloc[i])[:40]!r}) with no step that reads its text "
            "(every step is (-1, -1))")
    t = np.flatnonzero(text)            # consecutive text steps of one document never go back
    same = doc[t[1:]] == doc[t[:-1]]
    back = same & ((start[t[1:]] < start[t[:-1]]) | (end[t[1:]] < end[t[:-1]]))
    if back.any():
        i = int(t[1:][np.argmax(back)])
        bad(f"has span ({start[i]}, {end[i]}) at step {i} before the previous text step's: spans must be in order")


def _tiles(lo: np.ndarray, hi: np.ndarray, total: int, what: str, bad) -> None:
    if lo[0] != 0 or hi[-1] != total or (lo >= hi).any() or (lo[1:] != hi[:-1]).any():
        bad(f"has documents that do not tile the {total:,} {what} in order, each non-empty")


def check_times(times: np.ndarray, step_bounds: np.ndarray, where) -> None:
    """A frames Run's ``times [steps]`` float64 time stamps, checked: finite, and never going back
    within a document (``step_bounds [documents, 2]``); a new document may start again from 0."""
    def bad(problem):
        raise RnnscopeError(f"{where} {problem}", RECORD)
    times = np.asarray(times)
    steps = int(step_bounds[-1, 1])
    if times.dtype != np.float64 or times.shape != (steps,):
        bad(f"has times of {times.dtype} {list(times.shape)}, expected float64 [{steps}]")
    if not np.isfinite(times).all():
        bad(f"has a time stamp {times[~np.isfinite(times)][0]} at step {int(np.argmin(np.isfinite(times)))}: "
            "time stamps must be finite")
    back = np.diff(times) < 0
    back[step_bounds[1:, 0] - 1] = False         # a document's first step may start anew
    if back.any():
        i = int(np.argmax(back)) + 1
        bad(f"has time stamp {times[i]:g} at step {i} before the previous step's {times[i - 1]:g}: time stamps "
            "must not decrease within a document")


def _int_column(column) -> bool:
    return np.issubdtype(np.asarray(column).dtype, np.integer)


def check_npy(f, path, shape: tuple[int, ...], dtype) -> int:
    """Read and check the header of the open ``.npy`` file ``f`` (never its data, never a pickle):
    ``shape``, ``dtype``, C order, and a size of exactly header + data. Returns the data's offset."""
    def bad(problem):
        raise RnnscopeError(f"{path} {problem}", RECORD)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            bad(f"has .npy format version {version}, which rnnscope does not write")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        bad(f"is not a readable .npy file ({first_line(err, 100)})")
    if got_dtype != np.dtype(dtype) or got_dtype.hasobject:
        bad(f"holds {got_dtype}, expected {np.dtype(dtype)}")
    if tuple(got_shape) != tuple(shape) or fortran:
        bad(f"has shape {list(got_shape)}{' (Fortran order)' if fortran else ''}, expected {list(shape)}")
    offset = f.tell()
    size = f.seek(0, 2)
    need = offset + int(np.prod(shape, dtype=np.int64)) * got_dtype.itemsize
    if size != need:
        bad(f"is {size:,} bytes, expected {need:,} for its header and {list(shape)} {got_dtype}")
    return offset
