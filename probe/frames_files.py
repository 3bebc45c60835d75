"""Frames from files someone made (``rnnscope probe --frames PATH [--times PATH]``), read as untrusted.

``PATH`` is one of:

- an ``.npz``: each array is one document ``[T, features]``, named by its key, in the file's order;
- a single ``.npy``: one document, named by the file's stem;
- a directory of ``.npy`` files: each one document, named by its stem, in sorted order (hidden names
  skipped; anything else in it, or a link that leads out of it, refused).

``--times`` has the same form with the same names, each array ``[T]`` the time stamps of that
document's frames (default: the step index). Arrays are read from their header first, never
unpickled (an object array is refused before its data is read), and then through
``corpus.frames_of``, whose checks every document passes: numbers, ``[T, features]`` with T >= 1,
the same features in every document, finite values, times that never decrease.
"""
from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

from rnnscope.errors import RnnscopeError, escaped, first_line

from .corpus import Frames, frames_of

# Every document's frames are read, converted and joined in memory before the model runs (``record``),
# three copies at once: past a quarter of a billion values (1 GB as float32), or 2 GB of the file's own
# bytes (a float64 or longdouble array of as many values is 2 to 4 times larger), a file is a mistake or a bomb
MAX_VALUES = 1 << 28
MAX_BYTES = 1 << 31
MAX_DOCUMENTS = 1 << 20       # each is one model call and one row of the Run's documents table
FORMS = "an .npz of arrays [T, features], an .npy, or a directory of .npy files"


def _header(f, where: str):
    """``(shape, fortran, dtype)`` from the open ``.npy`` stream ``f``'s header; never its data."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise RnnscopeError(f"{where} is not a readable .npy array ({first_line(err, 100)})",
                            f"write it with numpy.save or numpy.savez ({FORMS})") from None


def _array(f, where: str, budget: list[int]) -> np.ndarray:
    """The array in the ``.npy`` stream ``f``: header checked, at most ``budget[0]`` values (spent), data
    read as plain bytes (no pickle) and required to be whole."""
    shape, fortran, dtype = _header(f, where)
    if dtype.hasobject or dtype.kind not in "biuf":       # objects would need a pickle; str, complex, records
        raise RnnscopeError(f"{where} holds {escaped(str(dtype), limit=40)} values",
                            "save frames as real numbers (float32, float64 or integers)")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RnnscopeError(f"{where} has a header of shape {escaped(str(shape), limit=60)}, not sizes >= 0",
                            f"write it with numpy.save or numpy.savez ({FORMS})")
    n = 1
    for d in shape:                      # Python ints, checked as they grow: an int64 product can wrap to 0
        n *= d
        if n > budget[0] or n * dtype.itemsize > MAX_BYTES:
            raise RnnscopeError(f"{where} holds {escaped(str(list(shape)), limit=60)} {dtype} values, past the "
                                f"{MAX_VALUES:,} values ({MAX_BYTES >> 30} GB) rnnscope reads at once",
                                "record fewer or shorter documents per Run")
    budget[0] -= n
    data = f.read(n * dtype.itemsize)
    if len(data) != n * dtype.itemsize:
        raise RnnscopeError(f"{where} is cut short: its header says {list(shape)} {dtype}",
                            "write the file again (it was not saved whole)")
    if f.read(1):                        # more data than the header says: not the array it claims to be
        raise RnnscopeError(f"{where} holds more data than its header's {list(shape)} {dtype}",
                            "write the file again with numpy.save or numpy.savez")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _npz(path: Path, budget) -> list[tuple[str, np.ndarray]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise RnnscopeError(f"{path} is not an .npz archive ({first_line(err, 80)})",
                            "write it with numpy.savez(path, name=array, ...)") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_DOCUMENTS:
            raise RnnscopeError(f"{path} holds {len(members):,} arrays", f"give at most {MAX_DOCUMENTS:,} documents a Run")
        out, seen = [], set()
        for m in members:
            name = m.filename[:-4] if m.filename.endswith(".npy") else None
            where = f"{path}[{escaped(m.filename, limit=60)}]"
            if not name or m.is_dir():
                raise RnnscopeError(f"{where} is not an array", "write the archive with numpy.savez, arrays only")
            if name in seen:
                raise RnnscopeError(f"{where} appears twice in the archive", "give each document one key")
            seen.add(name)
            try:
                with archive.open(m) as f:
                    out.append((name, _array(f, where, budget)))
            except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, OSError, EOFError) as err:
                raise RnnscopeError(f"{where} cannot be read from the archive ({first_line(err, 80)})",
                                    "write the archive again with numpy.savez") from None
    return out


def _regular(p: Path, root: Path | None) -> None:
    """``p`` is a regular file (not a FIFO or device, which would hang) and, in a directory ``root``,
    resolves inside it."""
    if root is not None and not p.resolve().is_relative_to(root.resolve()):
        raise RnnscopeError(f"{p} leads out of {root}", "copy the file into the directory instead of linking to it")
    try:
        mode = os.stat(p).st_mode
    except OSError as err:
        raise RnnscopeError(f"{p} cannot be read ({err.strerror})", f"give {FORMS}") from None
    if not stat.S_ISREG(mode):
        raise RnnscopeError(f"{p} is not a regular file", f"give {FORMS}")


def _npy(p: Path, budget) -> np.ndarray:
    try:
        with open(p, "rb") as f:
            return _array(f, str(p), budget)
    except OSError as err:
        raise RnnscopeError(f"{p} cannot be read ({err.strerror})", f"give {FORMS}") from None


def _directory(root: Path, budget) -> list[tuple[str, np.ndarray]]:
    names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    if len(names) > MAX_DOCUMENTS:
        raise RnnscopeError(f"{root} holds {len(names):,} files", f"give at most {MAX_DOCUMENTS:,} documents a Run")
    out = []
    for n in names:
        p = root / n
        _regular(p, root)
        if not n.endswith(".npy"):
            raise RnnscopeError(f"{p} is not an .npy file", "leave only .npy files (one document each) in the directory")
        out.append((n[:-4], _npy(p, budget)))
    return out


def read_arrays(path, budget: list[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` of each document in ``path`` (an .npz, an .npy or a directory of them), in order."""
    path, budget = Path(path), [MAX_VALUES] if budget is None else budget
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise RnnscopeError(f"{path} cannot be read ({err.strerror})", f"give {FORMS}") from None
    if stat.S_ISDIR(mode):
        out = _directory(path, budget)
    else:
        _regular(path, None)
        if path.suffix.lower() not in (".npz", ".npy"):
            raise RnnscopeError(f"{path} is neither .npz nor .npy", f"give {FORMS}")
        out = _npz(path, budget) if path.suffix.lower() == ".npz" else [(path.stem, _npy(path, budget))]
    if not out:
        raise RnnscopeError(f"{path} holds no arrays", f"give {FORMS}, at least one document")
    return out


def read_frames(path, times=None) -> Frames:
    """The documents of frames in ``path``, with the time stamps in ``times`` (the same form and names;
    see the module), checked as ``corpus.frames_of`` checks frames given in Python."""
    budget = [MAX_VALUES]
    docs = read_arrays(path, budget)
    stamps = dict(read_arrays(times, budget)) if times is not None else {}
    names = [n for n, _ in docs]
    fix = "give --times the same keys (or file names) as --frames"
    for n in (n for n in names if times is not None and n not in stamps):
        raise RnnscopeError(f"document {n!r} of {path} has no times in {times}", fix)
    for n in (n for n in stamps if n not in names):
        raise RnnscopeError(f"{times} holds times for {n!r}, which is not a document of {path}", fix)
    frames = frames_of([{"name": n, "input": a, **({"times": stamps[n]} if times is not None else {})}
                        for n, a in docs])
    frames.source = str(path)
    return frames


# flags of `probe` that do not go with --frames, and why
NOT_WITH_FRAMES = {
    "--encoder": "an encoder turns text into ids, and frames go to the model as they are",
    "--attention": "attention is stored over an encoder's source, which a frames Run has none of",
    "--max-chars": "frames have no characters",
    "--unk": "frames have no characters",
}


def check_frames_flags(given: dict) -> None:
    """Refuse, in one line, the first flag of ``given`` (flag -> value, None or falsy when not given)
    that does not go with ``--frames``."""
    for flag, value in given.items():
        if value and flag in NOT_WITH_FRAMES:
            raise RnnscopeError(f"--frames does not go with {flag}: {NOT_WITH_FRAMES[flag]}", f"leave {flag} out")
