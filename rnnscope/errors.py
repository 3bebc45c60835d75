"""The bottom of the stack: the one exception type users see, the one escaping policy for text from
someone else, and the one way to call the user's code.

Everything a message, a terminal line or a page shows of a name, a token or an exception from a file
or from the user's code goes through ``hidden`` (which characters cannot be shown as they are) and
``escaped`` (a string made safe and short); an exception becomes one line through ``first_line``;
the user's code runs through ``call_user``, which turns its failure into a ``RnnscopeError``.
"""
from __future__ import annotations

import traceback
import unicodedata
from pathlib import Path

# Categories that are never shown as they are: controls (ESC rewrites a terminal), format characters
# (U+202E and the other bidi overrides reorder what follows; zero-width joiners hide text), line and
# paragraph separators (U+2028 breaks a "one-line" message), lone surrogates (cannot be encoded, so
# printing one raises UnicodeEncodeError) and private-use characters (drawn as anything).
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})
_ASCII_HIDDEN = frozenset([*range(0x20), 0x7f])
LIMIT = 200           # characters of someone else's text in one message: a 1 MB name is not a 1 MB line
MESSAGE = 2000        # the whole problem (or fix) of one error line, whatever was quoted into it


def hidden(ch: str) -> bool:
    """Whether the character ``ch`` must be shown as an escape rather than as itself."""
    o = ord(ch)
    if o < 0x80:
        return o in _ASCII_HIDDEN
    return unicodedata.category(ch) in HIDDEN_CATEGORIES


def code(ch: str) -> str:
    """``\\n``, ``\\x1b``, ``\\u202e``: how an escaped character is written on a terminal."""
    return repr(ch)[1:-1] if ch.isascii() else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"


def escaped(text, keep: str = "", limit: int | None = LIMIT) -> str:
    """``text`` with every hidden character written as its escape (``keep`` names the ones that stay,
    e.g. ``"\\n\\t"`` for generated text printed whole), cut to ``limit`` characters with ``…``."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isascii() and text.isprintable():
        return text
    return "".join(code(c) if hidden(c) and c not in keep else c for c in text)


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, escaped and cut (its type when it says nothing)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return escaped(lines[0].strip(), limit=limit) if lines else type(err).__name__


class RnnscopeError(Exception):
    """A problem with the user's input. ``str(err)`` is one line: what is wrong, then what to do.

    The command line prints it as ``rnnscope: error: ...`` and exits non-zero; library
    callers can catch it. Anything else escaping is a bug in rnnscope.
    """

    def __init__(self, problem: str, fix: str | None = None):
        # a name or value quoted from someone else's file may hold a newline or a terminal escape:
        # shown escaped, the message stays one line and cannot rewrite the user's terminal
        self.problem = escaped(problem, limit=MESSAGE)
        self.fix = None if fix is None else escaped(fix, limit=MESSAGE)
        problem, fix = self.problem, self.fix
        super().__init__(problem if not fix else f"{problem} — {fix}")


def failure(err: BaseException, doing: str, fix: str = "fix the code there", where: Path | None = None
            ) -> RnnscopeError:
    """One line for an exception raised by the user's code: what was being done, where in their code
    (the last frame in the file ``where``, else the last frame outside rnnscope and torch), what it said."""
    frames = traceback.extract_tb(err.__traceback__)
    theirs = [f for f in frames if (Path(f.filename) == where if where is not None else not _ours(f.filename))]
    at = f" at {theirs[-1].filename} line {theirs[-1].lineno}" if theirs else ""
    return RnnscopeError(f"{doing}: {type(err).__name__}{at}: {first_line(err)}", fix)


# rnnscope's own packages (rnnscope/, probe/, analysis/, ...: the repository's folders, or the installed
# package's) and torch: frames there are not where the user's code went wrong
_OURS = tuple(str(Path(__file__).resolve().parent.parent / d) + "/"
              for d in ("rnnscope", "probe", "analysis", "dashboards", "zoo"))
_TORCH = "/torch/"


def _ours(filename: str) -> bool:
    return filename.startswith(_OURS) or _TORCH in filename or filename.startswith("<frozen")


def call_user(fn, *args, doing: str, fix: str = "fix the code there", where: Path | None = None, **kwargs):
    """``fn(*args, **kwargs)``, where ``fn`` is the user's code (an encoder, a loss, a model's call, a
    spec function): its failure, ``SystemExit`` included, becomes one ``RnnscopeError`` line; our own
    errors and Ctrl-C pass through."""
    try:
        return fn(*args, **kwargs)
    except (RnnscopeError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as err:
        raise failure(err, doing, fix, where) from None
