"""The one exception type users see: a single line naming the problem and the fix."""


_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(32), 127, *range(0x80, 0xA0), 0x2028, 0x2029)}


class RnnscopeError(Exception):
    """A problem with the user's input. ``str(err)`` is one line: what is wrong, then what to do.

    The command line prints it as ``rnnscope: error: ...`` and exits non-zero; library
    callers can catch it. Anything else escaping is a bug in rnnscope.
    """

    def __init__(self, problem: str, fix: str | None = None):
        # a name or value quoted from someone else's file may hold a newline or a terminal escape:
        # shown escaped, the message stays one line and cannot rewrite the user's terminal
        self.problem = str(problem).translate(_CONTROL)
        self.fix = None if fix is None else str(fix).translate(_CONTROL)
        problem, fix = self.problem, self.fix
        super().__init__(problem if not fix else f"{problem} — {fix}")
