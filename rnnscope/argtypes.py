"""Argument types for the command line: each turns one string into a checked value, or raises
``argparse.ArgumentTypeError`` with the problem and the fix, which the parser prints as one line.

Checks that need nothing but the argument live here, so a bad number or path is refused before any
model is loaded or any file is written.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import stat
from pathlib import Path

from rnnscope.store.keys import UNIT      # a unit: a state key and an index, the store's one grammar


def _bad(problem: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{problem} — {fix}")


def _integer(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip(), re.ASCII):
        raise _bad(f"{text!r} is not a whole number", "write it in ASCII digits, e.g. 16")
    return int(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(f"{text!r} is not a number", "write it as e.g. 0.3") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _bad(f"{text!r} is not a finite number", "give a finite number")
    return value


def _checked(what: str, convert, ok, rule: str, fix: str):
    """A type that converts with ``convert`` and accepts values where ``ok(value)``: 'must be {rule}'."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise _bad(f"must be {rule} (got {value})", fix)
        return value
    parse.__name__ = what          # argparse names the type in its messages
    return parse


# Upper bounds of the counts that size memory or time, by flag: a count past these is a typo or an attack,
# refused before a model is loaded (measured on one CPU core, a 2x128 LSTM)
UPPER = {
    # generate: each character is one forward step (~0.2 ms) and one row per seed; 1e9 ended in MemoryError
    "--length": 1_000_000, "--seeds": 10_000,
    # spectrum: every position costs max_lag QR steps of [units, exponents]; 100,000 characters at the
    # defaults take minutes, more is hours with no progress
    "--chars": 1_000_000, "--positions": 100_000, "--max-lag": 100_000,
    # exponents are at most the layer's units: no recurrent layer rnnscope records has more than this
    "--exponents": 65_536,
}


def int_at_least(low: int, what: str = "a number"):
    """A whole number ``>= low`` (and, for a flag in ``UPPER``, at most its bound)."""
    at_least = _checked(what, _integer, lambda v: v >= low, f"at least {low}", f"give {low} or more")
    high = UPPER.get(what)
    if high is None:
        return at_least
    at_most = _checked(what, _integer, lambda v: v <= high, f"at most {high:,}",
                       f"give at most {high:,} (a larger {what} would run out of memory or time)")

    def parse(text: str) -> int:
        return at_most(str(at_least(text)))
    parse.__name__ = what
    return parse


def int_between(low: int, high: int, what: str):
    return _checked(what, _integer, lambda v: low <= v <= high, f"from {low} to {high}", "give a value in that range")


def fraction(what: str):
    """A number strictly between 0 and 1."""
    return _checked(what, _number, lambda v: 0 < v < 1, "between 0 and 1", "give a share such as 0.3")


def positive_number(what: str):
    return _checked(what, _number, lambda v: v > 0, "above 0", "give a positive number")


def nonnegative_number(what: str):
    return _checked(what, _number, lambda v: v >= 0, "0 or more", "give 0 or a positive number")


def probability(what: str):
    """A probability in [0, 1) (dropout)."""
    return _checked(what, _number, lambda v: 0 <= v < 1, "from 0 up to (not including) 1", "give e.g. 0.2")


port = int_between(1, 65535, "port")


def host(text: str) -> str:
    """An address to bind: a name or IP that resolves on this machine (``::1`` and ``[::1]`` work)."""
    name = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not name:
        raise _bad("the host is empty", "give an address such as 127.0.0.1")
    try:
        socket.getaddrinfo(name, None)
    except (socket.gaierror, UnicodeError, ValueError):
        raise _bad(f"host {text!r} does not resolve", "give an address such as 127.0.0.1, ::1 or 0.0.0.0") from None
    return name


def text_file(text: str) -> Path:
    """An existing regular file (not a directory, FIFO or device, which would hang or mislead)."""
    path = Path(text)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise _bad(f"{text} does not exist", "give an existing text file") from None
    except OSError as err:
        raise _bad(f"{text} cannot be read ({err.strerror})", "give a readable text file") from None
    if stat.S_ISDIR(mode):
        raise _bad(f"{text} is a directory", "give a text file inside it")
    if not stat.S_ISREG(mode):
        raise _bad(f"{text} is not a regular file", "give a text file (not a pipe or device)")
    if not os.access(path, os.R_OK):
        raise _bad(f"{text} is not readable", "check its permissions")
    return path


def text_source(text: str) -> Path:
    """A text file, a directory of text files, or a ``.jsonl`` file: a regular file or a directory."""
    if Path(text).is_dir():
        if not os.access(text, os.R_OK | os.X_OK):
            raise _bad(f"{text} is not readable", "check its permissions")
        return Path(text)
    return text_file(text)


def module_names(text: str) -> list[str]:
    """``--modules rnn,encoder.rnn``: qualified module names as ``model.named_modules()`` gives them."""
    parts = [p.strip() for p in text.split(",")]
    for p in parts:
        if not re.fullmatch(r"\w+(?:\.\w+)*", p, re.ASCII):
            raise _bad(f"{p!r} is not a module name", "give qualified names such as rnn, encoder.lstm or layers.0")
    return parts


def unit(text: str) -> str:
    """``KEY:INDEX``, e.g. ``rnn.l0.c:12``; whether the Run has it is checked when the Run is open."""
    if not UNIT.match(text):
        raise _bad(f"{text!r} is not a unit", "write units as KEY:INDEX, e.g. rnn.l0.c:12")
    return text


def units(text: str) -> list[str]:
    parts = [u.strip() for u in text.split(",")]
    return [unit(u) for u in parts]


def name(text: str) -> str:
    """A plain name (a feature, a kind): letters, digits and underscores."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text.strip(), re.ASCII):
        raise _bad(f"{text!r} is not a name", "give names such as in_comment or column")
    return text.strip()


def names(text: str) -> list[str]:
    """A comma-separated list of plain names."""
    return [name(p) for p in text.split(",")]


def features(text: str) -> list[str]:
    """A comma-separated list of built-in feature names and ``file.py:fn`` / ``package.module:fn`` specs
    (a spec's function is loaded later, by the command)."""
    items = [p.strip() for p in text.split(",")]
    for item in items:
        if ":" in item:
            target, _, attr = item.rpartition(":")
            if not target or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", attr, re.ASCII):
                raise _bad(f"{item!r} is not file.py:function or package.module:function",
                           "write e.g. feats.py:features, beside built-in names such as column")
        else:
            name(item)
    return items


def clamp(text: str) -> str:
    """``KEY:INDEX=VALUE`` with a finite number; the unit itself is checked against the model."""
    unit_part, eq, value = text.rpartition("=")
    if not eq:
        raise _bad(f"{text!r} is not a clamp", "write KEY:INDEX=VALUE, e.g. rnn.l0.c:199=-3")
    unit(unit_part)
    _number(value)
    return text
