"""Files on disk: the one atomic write, paths kept inside a Run, and reads that cannot hang.

Everything read from a Run or a checkpoint is someone else's input: a path in it is never
followed out of its directory, a file is opened only once it is known to be a regular file (a
FIFO or a device would block or never end), and nothing is ever unpickled.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from rnnscope.errors import RnnscopeError


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a file beside ``path``, then rename it over ``path``: a kill at any
    instant leaves either the old file or the new one, never half of one, and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the PID tells a later writer whether a temporary left behind is a killed writer's (``alive``)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (another user's counts: it cannot be signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def inside(root, relative: str, *, write: bool = False, what: str = "the Run",
           fix: str = "the Run is damaged or hostile; record it again with `rnnscope probe`") -> Path:
    """``root / relative``, refused unless it stays inside ``root`` once every link is resolved.

    With ``write``, no existing part of the path below ``root`` may be a symbolic link at all, so
    nothing is ever written through one (a Run whose ``analysis/`` points elsewhere). ``what`` names
    the folder in a message (a Run, a watch log, a checkpoint), ``fix`` says what to do.
    """
    root = Path(root)
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts or "\0" in relative:
        raise RnnscopeError(f"{root}: the path {relative!r} leaves {what}", fix)
    target = root.joinpath(*parts)
    if write:
        for i in range(1, len(parts) + 1):
            part = root.joinpath(*parts[:i])
            if part.is_symlink():
                raise RnnscopeError(f"{part} is a symbolic link inside {what}; rnnscope does not write through one",
                                    "replace the link with a real directory or file")
    real_root = root.resolve()
    if not target.resolve().is_relative_to(real_root):
        raise RnnscopeError(f"{target} points outside {what} ({target.resolve()})", fix)
    return target


def regular_file(path, what: str, fix: str) -> os.stat_result:
    """``os.stat`` of ``path``, refused with one line unless it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RnnscopeError(f"{what} {path} is missing", fix) from None
    except OSError as err:
        raise RnnscopeError(f"{what} {path} cannot be read ({err.strerror})", fix) from None
    if not stat.S_ISREG(st.st_mode):
        raise RnnscopeError(f"{what} {path} is not a regular file", fix)
    return st


def read_bytes(path, what: str, fix: str, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (a manifest or card is small)."""
    st = regular_file(path, what, fix)
    if st.st_size > limit:
        raise RnnscopeError(f"{what} {path} is {st.st_size:,} bytes, more than the {limit:,} it can be", fix)
    with open(path, "rb") as f:
        return f.read(min(limit, st.st_size) + 1)     # a manifest's absurd count must not size the read


def read_text(path, fix: str = "convert it to UTF-8") -> str:
    """A text file exactly as stored: UTF-8, line endings untouched (``newline=''``), so a Run's text and
    its checksum match the file byte for byte. ``fix`` completes the message for a file that is not UTF-8."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise RnnscopeError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})", fix) from None
    except OSError as err:
        raise RnnscopeError(f"{path} cannot be read ({err.strerror})", "give a readable text file") from None
