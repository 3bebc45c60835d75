"""Writing a Run: beside its final name, then swapped in whole, and only ever over a Run.

``RunWriter(out, text, overwrite=...)`` checks ``out`` before anything is written (a file, a link,
``.``, a path under a file, or a directory that is not a Run is refused), removes what killed
writers left behind, and fills ``.NAME.partial-PID-XXXX``; ``commit(manifest)`` swaps it in. The swap
holds a lock on the parent directory, so two writers of one output never interleave, and uses an
atomic exchange where the kernel has one: the output is a whole Run at every instant, and the
old Run is deleted under the partial's name, which the next writer clears if a kill interrupts.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError

from .files import alive, inside
from .layout import char_spans, one_document
from .format import DTYPES, FORMAT, FORMAT_VERSION, check_manifest, check_steps, check_times, key_file
from .run import is_run, partials
from .docfields import stored
from .keys import KEY
from .tables import DOCUMENTS_SCHEMA, TEMPORARY, UNITS_SCHEMA, write_parquet

try:
    import fcntl
except ImportError:          # Windows: no advisory locks; the swap is still checked, just not serialised
    fcntl = None


class NpyRows:
    """Rows appended to a ``.npy`` file with ``os.pwrite``. NumPy writes the header; rows go
    through the page cache without being mapped into this process, so RSS stays flat however long
    the text is (writing through ``np.memmap`` would keep every dirty page resident). Values are
    written as given: NaN and Inf stay NaN and Inf."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        header = np.lib.format.open_memmap(path, "w+", dtype, shape)
        self.offset, self.row = header.offset, int(np.prod(shape[1:], dtype=np.int64)) * header.itemsize
        self.dtype = np.dtype(dtype)
        del header
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.offset + start * self.row)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (what ``kill``, ``timeout`` and job schedulers send) interrupt like Ctrl-C: the
    partial Run is removed and the old one left as it was, with one line, instead of a partial folder
    that only the next write to the same output removes. (SIGKILL cannot be caught: it leaves a
    ``.NAME.partial-PID-…`` folder, which the next probe of that output removes, saying so.)"""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:      # not over a handler the caller installed
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _no_space(err: OSError, out: Path, need: int) -> RnnscopeError:
    """One line for a disk that filled while the Run was written (the partial Run is already removed)."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = 0
    return RnnscopeError(f"no space left on {out.parent}: the Run needs {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB "
                         f"are free; nothing was written to {out}",
                         "free space (another process filled the disk while this one wrote), or pass another --out")


def text_bytes(text: str) -> bytes:
    """The text as ``text.txt`` stores it: UTF-8, byte for byte (no newline translation)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RnnscopeError(f"the text holds {text[err.start]!r} at {err.start}, which UTF-8 cannot store",
                            "remove unpaired surrogates from the text") from None


def check_out(out, overwrite: bool) -> Path:
    """Refuse an output that is not a new path, an empty directory, or (with ``overwrite``) a Run.
    Nothing is written: every refusal leaves the disk as it was."""
    out = Path(out)
    choose = "choose another --out"
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(out.resolve()):
        raise RnnscopeError(f"--out {out} is the current directory or above it", "name a new directory for the Run")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise RnnscopeError(f"--out {out} is under {parent}, which is not a directory", choose)
            break
    if out.is_symlink():
        raise RnnscopeError(f"--out {out} is a symbolic link; rnnscope does not write through one", choose)
    if not out.exists():
        return out
    if not out.is_dir():
        raise RnnscopeError(f"--out {out} is an existing file, not a Run", choose)
    if not overwrite:
        raise RnnscopeError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    if any(out.iterdir()) and not is_run(out):
        raise RnnscopeError(f"{out} is not a Run (no rnnscope manifest.json), so --overwrite will not replace it",
                            f"{choose}, or move that directory away yourself")
    foreign = foreign_files(out)
    if foreign:             # inside the folders rnnscope reads back and checks: refused, never carried over
        raise RnnscopeError(f"{out} holds files rnnscope did not write ({', '.join(foreign)}), which --overwrite "
                            "would delete", f"move them out of the Run first, or {choose}")
    return out


def kept_files(run: Path) -> list[Path]:
    """What the user put at the top of the Run folder ``run`` (an exported figure, notes, a folder of
    their own): ``--overwrite`` carries it into the Run that replaces this one, never deletes it."""
    return [p for p in sorted(run.iterdir()) if not _own_top(p)]


def _own_top(p: Path) -> bool:
    is_dir = p.is_dir() and not p.is_symlink()
    return (p.name in RUN_FILES and not is_dir and not p.is_symlink()) or (is_dir and p.name in RUN_DIRS)


def carry_kept(old: Path, new: Path) -> None:
    """Copy ``kept_files(old)`` into the unfinished Run ``new`` (a link as a link), before the swap: a kill
    at any moment leaves them in the old Run or in both."""
    for p in kept_files(old):
        target = new / p.name
        if target.exists() or target.is_symlink():
            raise RnnscopeError(f"{old}/{p.name} is not rnnscope's, and the new Run writes {p.name}",
                                "move it out of the Run first")
        if p.is_symlink():
            os.symlink(os.readlink(p), target)
        elif p.is_dir():
            shutil.copytree(p, target, symlinks=True)
        else:
            shutil.copy2(p, target)


# what rnnscope writes in a Run (``store.run``), and in each shard of a sharded one (``store.shards``)
RUN_FILES = {"manifest.json", "text.txt", "spans.npy", "ids.npy", "documents.parquet", "loss.npy",
             "document_loss.npy", "units.parquet", "times.npy"}
RUN_DIRS = {"states", "analysis", "shards", "attention", "source", "encoder"}
_TABLE = re.compile(r"^[a-z][a-z0-9_]{0,63}\.(?:parquet|json)$")
_SHARD = re.compile(r"^(?:[0-9]{5,9}|\.[0-9]{5,9}\.partial-[A-Za-z0-9_.]+-\d+-\w+)$")


def foreign_files(run: Path, limit: int = 3) -> list[str]:
    """The first ``limit`` paths inside the Run's own folders (``states/``, ``analysis/``, a shard) that
    rnnscope did not write (a link is never one of its own): what ``--overwrite`` would delete with the
    Run. What the user put at the Run's top is carried over instead (``kept_files``)."""
    found: list[str] = []

    def walk(folder: Path, rel: str, shard: bool) -> None:
        for p in sorted(folder.iterdir()):
            name, is_dir = rel + p.name, p.is_dir() and not p.is_symlink()
            if len(found) >= limit:
                return
            if not is_dir and not p.is_symlink() and p.name in RUN_FILES:
                continue
            if is_dir and p.name == "states":
                found.extend(f"{name}/{q.name}" for q in sorted(p.iterdir()) if q.is_symlink() or not q.is_file()
                             or not (q.name.endswith(".npy") and KEY.match(q.name[:-4])))
            elif is_dir and p.name == "analysis" and not shard:
                found.extend(f"{name}/{q.name}" for q in sorted(p.iterdir()) if q.is_symlink() or not q.is_file()
                             or not (_TABLE.match(q.name) or TEMPORARY.match(q.name)))
            elif is_dir and p.name == "encoder" and not shard:      # the encoder's side: a Run of its own
                walk(p, f"{name}/", False)
            elif is_dir and p.name == "shards" and not shard:
                for q in sorted(p.iterdir()):
                    if q.is_dir() and not q.is_symlink() and _SHARD.match(q.name):
                        walk(q, f"{name}/{q.name}/", True)
                    else:
                        found.append(f"{name}/{q.name}")
            elif shard:
                found.append(name + "/" * is_dir)
    walk(run, "", False)
    return found[:limit]


def clean_stale(out: Path, log=print) -> list[Path]:
    """Remove ``.NAME.partial-PID[-XXXX]`` directories whose writer is gone (a SIGKILLed probe), and say so.
    An old Run moved aside by a swap that was killed half-way is put back if nothing replaced it."""
    pattern = partials(out)
    gone = []
    if not out.parent.is_dir():
        return gone
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or int(m[1]) == os.getpid() or alive(int(m[1])) or not p.is_dir() or p.is_symlink():
            continue
        if m[2] and not out.exists() and not out.is_symlink():
            os.rename(p, out)
            log(f"probe: restored {out} from {p.name}, left by a probe killed while replacing it")
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    if gone:
        log(f"probe: removed {len(gone)} unfinished run(s) left by a killed probe: {', '.join(p.name for p in gone)}")
    return gone


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False            # an old kernel, or a file system without exchange: fall back
    raise OSError(err, os.strerror(err), str(b))


class RunWriter:
    """``with RunWriter(out, text, spans=..., ids=..., documents=...) as w:`` fill ``w.states(...)``,
    ``w.loss()``, ``w.units(frame)``, then ``w.commit(manifest)``. Leaving the block without a commit
    removes the partial Run. Without ``spans`` each character is a step; without ``documents`` the
    text is one document; ``ids [steps]`` are the model's input ids (optional). ``times [steps]``
    float64 makes a frames Run: its steps are input frames stamped with times, its text ``""``."""

    def __init__(self, out, text: str, *, spans=None, ids=None, documents: pd.DataFrame | None = None,
                 dtype: str = "float16", overwrite: bool = False, log=print, times=None):
        self.out, self.overwrite, self.dtype, self.log = check_out(out, overwrite), overwrite, dtype, log
        self.data = text_bytes(text)
        self.chars = len(text)
        if spans is None:
            spans = char_spans(self.chars)
        self.spans = np.asarray(spans, np.int64)
        self.steps = len(self.spans)
        self.documents = one_document(self.chars, self.steps) if documents is None else documents
        check_steps(self.spans, self.documents, self.chars, "the Run being written", frames=times is not None)
        self.times = None if times is None else np.asarray(times, np.float64)
        if self.times is not None:
            check_times(self.times, self.documents[["step_start", "step_end"]].to_numpy(np.int64),
                        "the Run being written")
        self.ids = None if ids is None else np.asarray(ids, np.int64)
        if self.ids is not None and self.ids.shape != (self.steps,):
            raise RnnscopeError(f"{len(self.ids)} ids for {self.steps} steps", "give one id per step")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out, log)
        # unique per writer (two writers may share a process); the PID tells a later writer whether it is stale
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
        try:
            (self.tmp / "states").mkdir()
            with open(self.tmp / "text.txt", "wb") as f:     # bytes: CR and CRLF are kept as they are
                f.write(self.data)
            np.save(self.tmp / "spans.npy", self.spans, allow_pickle=False)
            if self.ids is not None:
                np.save(self.tmp / "ids.npy", self.ids, allow_pickle=False)
            if self.times is not None:
                np.save(self.tmp / "times.npy", self.times, allow_pickle=False)
            write_parquet(self.tmp / "documents.parquet", stored(self.documents, log), DOCUMENTS_SCHEMA, "documents")
        except OSError as err:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise _no_space(err, self.out, len(self.data)) from None
            raise
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.rows: list[NpyRows] = []
        self.need = len(self.data) + self.spans.nbytes     # grows with every file declared
        self.key_dtypes: dict[str, str] = {}
        self.done = False

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close()
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise _no_space(err, self.out, self.need) from None

    def close(self) -> None:
        for r in self.rows:
            r.close()

    def states(self, key: str, units: int, dtype: str | None = None) -> NpyRows:
        """The row writer of ``states/{key}.npy`` ``[steps, units]`` in ``dtype`` (default the Run's)."""
        self.key_dtypes[key] = dtype or self.dtype
        self.rows.append(NpyRows(inside(self.tmp, key_file(key), write=True), DTYPES[self.key_dtypes[key]],
                                 (self.steps, units)))
        self.need += self.steps * units * np.dtype(DTYPES[self.key_dtypes[key]]).itemsize
        return self.rows[-1]

    def loss(self) -> NpyRows:
        """The row writer of ``loss.npy`` ``[steps]`` (kept only if the manifest names a loss)."""
        self.rows.append(NpyRows(self.tmp / "loss.npy", np.float32, (self.steps,)))
        return self.rows[-1]

    def document_loss(self, values: np.ndarray) -> None:
        """``document_loss.npy`` ``[documents]`` float32: a loss that is one scalar per document."""
        if np.shape(values) != (len(self.documents),):
            raise RnnscopeError(f"{len(values)} document losses for {len(self.documents)} documents",
                                "give one loss per document")
        np.save(self.tmp / "document_loss.npy", np.asarray(values, np.float32), allow_pickle=False)

    def read_loss(self) -> np.ndarray:
        return np.load(self.tmp / "loss.npy", mmap_mode="r", allow_pickle=False)

    def units(self, frame: pd.DataFrame) -> None:
        write_parquet(self.tmp / "units.parquet", frame, UNITS_SCHEMA, "units")

    def commit(self, manifest: dict) -> Path:
        """Write the manifest (format, text checksum, steps, files filled in here) and swap the Run in.
        ``manifest["loss"]`` (default None) says whether ``loss.npy`` is kept."""
        self.close()
        identity = self.steps == self.chars and (self.spans[:, 0] == np.arange(self.chars)).all() \
            and (self.spans[:, 1] == np.arange(1, self.chars + 1)).all()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "encoder": {"kind": "char" if identity else "spans", "name": None}, "carry": False,
                    "loss": None, **manifest,
                    **({"encoder": {"kind": "frames", "name": None}} if self.times is not None else {}),
                    "text": {"chars": self.chars, "sha256": hashlib.sha256(self.data).hexdigest(),
                             "newlines": "as stored"},
                    "steps": self.steps, "documents": len(self.documents), "ids": self.ids is not None,
                    "dtype": self.dtype}
        if manifest["loss"] is None or manifest["loss"].get("per") != "document":
            (self.tmp / "document_loss.npy").unlink(missing_ok=True)
        if manifest["loss"] is None:
            (self.tmp / "loss.npy").unlink(missing_ok=True)
        elif not (self.tmp / "loss.npy").exists():
            raise RnnscopeError("the manifest names a loss but none was written", "fill w.loss() before commit")
        manifest["keys"] = {k: {**v, "file": key_file(k), "dtype": self.key_dtypes.get(k, self.dtype)}
                            for k, v in manifest["keys"].items()}
        check_manifest(manifest, self.tmp)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        self._swap()
        self.done = True
        return self.out

    def _swap(self) -> None:
        swap_in(self.tmp, self.out, self.overwrite, placed=lambda: setattr(self, "done", True))


def swap_in(tmp: Path, out: Path, overwrite: bool, placed=lambda: None) -> None:
    """Swap the whole Run in the folder ``tmp`` in as ``out`` (under a lock on the parent folder,
    atomically where the kernel can); ``placed()`` is called as soon as the new Run is in place; an old
    Run at ``out`` is then deleted (``remove_old``)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)          # one swap at a time in this directory
        try:
            check_out(out, overwrite)               # again: another writer may have been first
        except RnnscopeError as err:
            raise RnnscopeError(f"{err.problem} (written by another process while this probe ran)",
                                err.fix) from None
        if out.exists():
            carry_kept(out, tmp)
        if not out.exists():
            os.rename(tmp, out)
            placed()
        elif _exchange(tmp, out):
            placed()
            remove_old(tmp, out)                    # the old Run, now under the partial's name
        else:
            old = tmp.with_name(tmp.name + ".old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)                 # put the old Run back
                raise
            placed()
            remove_old(old, out)
    finally:
        os.close(fd)


def remove_old(old: Path, out: Path) -> None:
    """Delete the replaced Run. The new one is already in place at ``out``: an interrupt here must say
    so, not that no Run was written (what is left of the old one is removed by the next probe)."""
    try:
        shutil.rmtree(old)
    except KeyboardInterrupt:
        raise RnnscopeError(f"interrupted after the new Run was written to {out}: the old one is "
                            f"partly deleted at {old}", "nothing to redo; the next probe of this "
                            "output removes the rest") from None
