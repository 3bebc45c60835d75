"""What ``record`` checks about each pass of the model over a document: that every recorded module ran
the encoder's steps (one row per step, under the right characters), and that a bidirectional module's
whole-document pass fits in memory.
"""
from __future__ import annotations

import os

from rnnscope.errors import RnnscopeError
from rnnscope.store import split_key

CHUNK = 2048            # steps per chunk when none is given (a bidirectional model: its longest document)
# bytes a step holds in memory per recorded unit in one pass, beyond the rows: the trace's float32 value
# and the engine's own output (x 2), with gradients also the gradient and the graph autograd keeps (x 4)
PASS_BYTES = {False: 2 * 4, True: 4 * 4}


def pass_memory() -> int:
    """The default bound on one pass's memory: a quarter of the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):      # no sysconf (Windows): 4 GB
        return 4 << 30


def check_aligned(trace, layout: dict, steps: int, where: str) -> None:
    """Refuse, in one line, a recorded module whose ``trace`` is not ``[1, steps, units]``: a decoder fed
    ``SOS + target`` (n + 1 steps for n), a free-running one (its own number), a module called twice or
    not at all. Its rows would be zero-filled or cut and placed under the wrong characters."""
    modules = {split_key(k)["module"]: k for k in layout}
    for module, k in modules.items():
        shape = tuple(trace[k].shape[:2]) if k in trace else (1, 0)
        if shape == (1, steps):
            continue
        got = f"{shape[1]:,} steps" if shape[0] == 1 else f"a batch of {shape[0]}"
        others = sorted({split_key(j)["module"] for j in trace if tuple(trace[j].shape[:2]) == (1, steps)})
        fix = (f"record only the modules on the text's steps with --modules {','.join(others)}" if others else
               "make the call run each recorded module once over the encoder's ids [1, T] (or --modules to leave "
               "it out)")
        raise RnnscopeError(f"the recurrent module {module or '<model>'!r} ran {got} where the encoder gave "
                            f"{steps:,} steps {where}; its rows would not line up with the text", fix)


def check_pass(module: str, name: str, steps: int, per_step: int, bound: int) -> None:
    """A bidirectional ``module`` reads each document in one pass: say so, or refuse when the longest
    (``name``, ``steps``) would hold more than ``bound`` bytes (``per_step`` each) in memory."""
    need = steps * per_step
    if need > bound:
        raise RnnscopeError(f"the bidirectional module {module!r} reads each document whole, and the longest "
                            f"({name!r}, {steps:,} steps) would hold about {need / 1e9:.2f} GB in one pass, over "
                            f"the {bound / 1e9:.2f} GB bound", "split long documents, record fewer --kinds or "
                            f"--modules, or pass --chunk {steps} to go over the bound")
    if steps > CHUNK:
        print(f"probe: the bidirectional module {module!r} reads each document whole: one pass of up to "
              f"{steps:,} steps (the longest document, about {need / 1e6:,.0f} MB)")
