"""The one exception type users see: a single line naming the problem and the fix."""


class RnnscopeError(Exception):
    """A problem with the user's input. ``str(err)`` is one line: what is wrong, then what to do.

    The command line prints it as ``rnnscope: error: ...`` and exits non-zero; library
    callers can catch it. Anything else escaping is a bug in rnnscope.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — {fix}")
