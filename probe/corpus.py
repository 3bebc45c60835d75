"""Corpora of documents: what ``record`` takes besides one text.

``frames_of(documents)`` takes documents of input frames instead (audio, sensor readings: arrays
``[T, features]`` with optional time stamps), which ``record`` feeds the model as they are.

``read_documents(path)`` reads a text file (one document), a directory of text files (each a
document, sorted by relative path, recursive, regular files only, hidden names and links that lead
out of the directory skipped), or a ``.jsonl`` file with a ``"text"`` field (and an optional
``"name"``; unnamed, ``file.jsonl#N``, N counted from 0 like every document index) on each line, its other fields (a label, metadata) kept for the user's ``call`` and
``loss`` (``Documents.document(i)``). ``documents_of(texts)`` turns a str, a list (of str, or of
dicts with a ``"text"`` like the ``.jsonl``'s lines), a dict name -> text or a ``Documents`` into one. Texts are read byte for byte (UTF-8, line endings untouched), so a Run's
text matches the files.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from rnnscope.errors import RnnscopeError, escaped, first_line
from rnnscope.store.files import read_text


@dataclass
class Documents:
    """Named texts, in order: ``for name, text in docs``; ``fields[i]``: document i's other fields
    (empty, or one dict per document)."""
    names: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    source: str = ""
    fields: list[dict] = field(default_factory=list)

    def document(self, i: int) -> dict:
        """Document ``i`` as the user's ``call`` and ``loss`` see it: ``name``, ``text`` and its other fields."""
        return {**(self.fields[i] if self.fields else {}), "name": self.names[i], "text": self.texts[i]}

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self):
        return iter(zip(self.names, self.texts))


def _read(path: Path) -> str:
    return read_text(path, "convert it to UTF-8, or leave it out of the corpus")


def _unpaired(value: str) -> int | None:
    """Where ``value`` holds a lone surrogate (JSON's ``"\\ud800"``), which no file or terminal can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _jsonl(path: Path) -> Documents:
    docs = Documents(source=str(path))
    # lines end at "\n" only (JSON Lines): str.splitlines would also split at U+2028, U+0085 and the
    # other separators, which a JSON string may hold raw
    for n, line in enumerate(_read(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise RnnscopeError(f"{path} line {n} is not JSON ({first_line(err, 80)})",
                                'write one JSON object per line, like {"text": "...", "name": "..."}') from None
        # unnamed: counted from 0 among the documents, as `--document N` and the picker count them
        # (a line number would count from 1 and count blank lines)
        _add_row(docs, row, f"{path} line {n}", f"{path.name}#{len(docs.texts)}")
    if not docs.texts:
        raise RnnscopeError(f"{path} holds no documents", 'write one JSON object per line with a "text" field')
    return docs


def _add_row(docs: Documents, row, where: str, default_name: str) -> None:
    """One ``{"text": ..., "name": ..., **fields}`` row into ``docs``; an encoder-decoder row
    ``{"source": ..., "target": ...}`` is its target's text, its source kept as a field."""
    if isinstance(row, dict) and "text" not in row and isinstance(row.get("source"), str) and "target" in row:
        row = {"text": row["target"], **{k: v for k, v in row.items() if k != "target"}}
    if isinstance(row, dict) and "text" not in row and ("source" in row) != ("target" in row):
        have, lacks = ("source", "target") if "source" in row else ("target", "source")
        raise RnnscopeError(f"{where} has a \"{have}\" but no \"{lacks}\" string (a pair with a side missing)",
                            'give every line both "source" and "target" strings, or a "text"')
    odd = [k for k in ("source", "target") if isinstance(row, dict) and "text" not in row and k in row
           and not isinstance(row[k], str)]
    if odd:
        raise RnnscopeError(f"{where} has a \"{odd[0]}\" that is a {type(row[odd[0]]).__name__}, not a string",
                            'give every line both "source" and "target" strings')
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise RnnscopeError(f"{where} has no \"text\" string", 'give each line a "text" field')
    name = row.get("name", default_name)
    if not isinstance(name, str):
        raise RnnscopeError(f"{where} has a \"name\" that is not a string", "make each name a string")
    for field_, value in (("name", name), ("text", row["text"])):
        at = _unpaired(value)
        if at is not None:
            raise RnnscopeError(f"{where}: its {field_} holds an unpaired surrogate {escaped(value[at])} at "
                                f"character {at}, which UTF-8 cannot store", "write the character it stands for, or remove it")
    docs.names.append(name)
    docs.texts.append(row["text"])
    docs.fields.append({k: v for k, v in row.items() if k not in ("text", "name")})


def _directory(root: Path) -> Documents:
    real_root, files = root.resolve(), []
    for folder, dirs, names in os.walk(root):        # links to folders are never walked into
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            p = Path(folder, name)
            if name.startswith(".") or not p.resolve().is_relative_to(real_root):
                continue
            try:
                mode = os.stat(p).st_mode
            except OSError as err:                  # a link to nothing, or a file that cannot be read
                raise RnnscopeError(f"{p} in the corpus cannot be read ({err.strerror}"
                                    f"{', a link to nothing' if p.is_symlink() else ''})",
                                    "remove it or restore what it points to") from None
            if stat.S_ISREG(mode):                  # not a FIFO or a device: those would hang
                files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise RnnscopeError(f"{root} holds no text files", "give a directory of text files, a file, or a .jsonl")
    return Documents([p.relative_to(root).as_posix() for p in files], [_read(p) for p in files], str(root))


def read_documents(path) -> Documents:
    """The documents of a text file, a directory of text files, or a ``.jsonl`` file (see the module)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise RnnscopeError(f"{path} cannot be read ({err.strerror})",
                            "give a text file, a directory of text files, or a .jsonl file") from None
    if stat.S_ISDIR(st.st_mode):
        return _directory(path)
    if not stat.S_ISREG(st.st_mode):
        raise RnnscopeError(f"{path} is not a regular file or a directory", "give a text file, a directory or a .jsonl")
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path)
    return Documents([path.name], [_read(path)], str(path))


def documents_of(texts) -> Documents:
    """A ``Documents`` from a str (one document, "text"), a list of str (named by position), a dict
    name -> str, or a ``Documents``; empty documents are refused, one line naming the first."""
    if isinstance(texts, Documents):
        docs = texts
    elif isinstance(texts, str):
        docs = Documents(["text"], [texts])
    elif isinstance(texts, dict):
        docs = Documents([str(k) for k in texts], list(texts.values()))
    elif isinstance(texts, (list, tuple)) and texts and all(isinstance(t, dict) for t in texts):
        docs = Documents()
        for i, row in enumerate(texts):
            _add_row(docs, row, f"document {i}", str(i))
    elif isinstance(texts, (list, tuple)):
        docs = Documents([str(i) for i in range(len(texts))], list(texts))
    else:
        raise RnnscopeError(f"texts is a {type(texts).__name__}",
                            "give a str, a list of str, a dict name -> str, or read_documents(path)")
    if not docs.texts:
        raise RnnscopeError("there are no documents", "give at least one text")
    for name, text in docs:
        if not isinstance(text, str):
            raise RnnscopeError(f"document {name!r} is a {type(text).__name__}, not text",
                                "give each document as a str")
        if not text:
            raise RnnscopeError(f"document {name!r} is empty" if len(docs) > 1 else "the text is empty",
                                "leave empty documents out; each needs at least one character")
    return docs


@dataclass
class Frames:
    """Named documents of input frames, in order: ``inputs[i] [T_i, features]`` float32, ``times[i] [T_i]``
    float64 time stamps (given, or the step index), ``fields[i]`` its other fields."""
    names: list[str] = field(default_factory=list)
    inputs: list = field(default_factory=list)
    times: list = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)
    source: str = ""

    def document(self, i: int) -> dict:
        """Document ``i`` as the user's ``call`` and ``loss`` see it: ``name``, ``input``, ``times`` and its fields."""
        return {**self.fields[i], "name": self.names[i], "input": self.inputs[i], "times": self.times[i]}

    def __len__(self) -> int:
        return len(self.inputs)


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (str, bytes))


def is_frames(documents) -> bool:
    """Whether ``documents`` are frames (an array, a dict name -> array, a list of arrays or of dicts with an
    ``"input"``) rather than texts; ``record`` then takes them through ``frames_of``."""
    if isinstance(documents, Frames) or _is_array(documents):
        return True
    values = list(documents.values()) if isinstance(documents, dict) else \
        list(documents) if isinstance(documents, (list, tuple)) else []
    return bool(values) and all(_is_array(v) or (isinstance(v, dict) and "input" in v) for v in values)


EXACT = 1 << 24         # integers up to this are exact in float32; past it a frame would be rounded unsaid


def frames_sha256(frames) -> str:
    """The checksum of one document's frames as the model got them (float32, C order): a Run keeps it
    (its documents' ``frames_sha256``) so frames given again later can be checked to be its own."""
    import hashlib
    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(frames, np.float32).tobytes()).hexdigest()


def _frames_array(x, where: str):
    import numpy as np
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim != 2 or len(a) < 1 or a.shape[1] < 1 or not (np.issubdtype(a.dtype, np.floating)
                                                            or np.issubdtype(a.dtype, np.integer)):
        raise RnnscopeError(f"{where} is a {a.dtype} array of shape {list(a.shape)}",
                            "give each document's frames as numbers [T, features], T >= 1")
    if np.issubdtype(a.dtype, np.integer) and a.size and (a.max() > EXACT or a.min() < -EXACT):
        t, f = np.argwhere((a > EXACT) | (a < -EXACT))[0]
        raise RnnscopeError(f"{where} holds the integer {a[t, f]} at frame {t}, feature {f}, past the +-{EXACT:,} "
                            "float32 holds exactly", "scale the frames, or give them as floats")
    with np.errstate(over="ignore"):         # a value past float32's range becomes inf, refused just below
        frames = a.astype(np.float32)
    if not np.isfinite(frames).all():       # a NaN frame makes every later state NaN: the data's mistake
        t, f = np.argwhere(~np.isfinite(frames))[0]
        raise RnnscopeError(f"{where} holds {a[t, f]} at frame {t}, feature {f}, not a finite float32",
                            "give finite frames (fill or drop the missing ones)")
    return frames


def _frame_times(t, steps: int, where: str):
    import numpy as np
    if t is None:
        return np.arange(steps, dtype=np.float64)
    t = np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)
    if t.shape != (steps,) or not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise RnnscopeError(f"{where} has times of {t.dtype} {list(t.shape)} for {steps} frames",
                            "give one time stamp per frame, [T] numbers")
    t = t.astype(np.float64)
    if not np.isfinite(t).all() or (np.diff(t) < 0).any():
        i = int(np.argmin(np.isfinite(t))) if not np.isfinite(t).all() else int(np.argmax(np.diff(t) < 0)) + 1
        raise RnnscopeError(f"{where} has the time stamp {t[i]} at frame {i}, not finite or before the one before",
                            "give finite time stamps that never decrease within a document")
    return t


def frames_of(documents) -> Frames:
    """A ``Frames`` from an array ``[T, features]`` (one document, "input"), a dict name -> array, a list
    of arrays (named by position) or of dicts ``{"input": [T, features], "times": [T], "name": ...,
    **fields}``; every document has the same number of features; each failure is one line."""
    if isinstance(documents, Frames):
        return documents
    rows = [{"name": "input", "input": documents}] if _is_array(documents) else \
        [{"name": str(k), "input": v} for k, v in documents.items()] if isinstance(documents, dict) else \
        [v if isinstance(v, dict) else {"input": v} for v in documents]
    out = Frames()
    for i, row in enumerate(rows):
        name = row.get("name", str(i))
        if not isinstance(name, str):
            raise RnnscopeError(f"document {i} has a \"name\" that is not a string", "make each name a string")
        a = _frames_array(row["input"], f"document {name!r}")
        if out.inputs and a.shape[1] != out.inputs[0].shape[1]:
            raise RnnscopeError(f"document {name!r} has {a.shape[1]} features but {out.names[0]!r} has "
                                f"{out.inputs[0].shape[1]}", "give every document the same features per frame")
        out.names.append(name)
        out.inputs.append(a)
        out.times.append(_frame_times(row.get("times"), len(a), f"document {name!r}"))
        out.fields.append({k: v for k, v in row.items() if k not in ("name", "input", "times")})
    if not out.inputs:
        raise RnnscopeError("there are no documents", "give at least one array of frames")
    return out
