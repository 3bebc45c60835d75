"""The loss ``record`` stores per step and differentiates: next-token cross-entropy, the user's, or none.

``resolve_loss`` looks at the model's output on a dry run before anything is written and returns a
``StepLoss`` (or None for states only); its ``window(output, s, e)`` gives the per-step losses of
steps ``s .. e-1`` (NaN where there is none) and the scalar to differentiate. The model's output is
checked against the ids first, so a head that is not next-token logits is one clear line, never
an IndexError deep inside torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rnnscope.errors import RnnscopeError, call_user

from .subject import takes_document

SHAPE_FIX = "pass --loss none, or --loss file.py:fn"
USER_FIX = "return one loss per step [T] for the ids [T] it is given, or a scalar"


def first_tensor(output):
    """The model's output, or the first part of a tuple (``(logits, hidden)`` as many models return)."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def shape_of(output, steps: int) -> str:
    """``[1, T, 2]``: the output's shape, the time axis written T where it matches the input."""
    t = first_tensor(output)
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    dims = [str(d) for d in t.shape]
    if t.dim() == 3 and t.shape[1] == steps:
        dims[1] = "T"
    return f"[{', '.join(dims)}]"


def is_next_token_logits(output, steps: int, max_id: int) -> bool:
    t = first_tensor(output)
    return (isinstance(t, torch.Tensor) and t.dim() == 3 and tuple(t.shape[:2]) == (1, steps)
            and t.shape[2] > max_id and t.is_floating_point())


@dataclass
class StepLoss:
    """``kind``: "next-token" or "user"; ``ids [S]`` the whole recording's input ids; ``next_ok [S]``:
    whether step t has a next token in its own document (the next-token target); ``bounds``: each
    document's (step_start, step_end)."""
    kind: str
    ids: torch.Tensor
    next_ok: np.ndarray
    bounds: list
    fn: Callable | None = None
    scalar: bool = False            # the user's loss returned a scalar (seen on its first window)

    def __post_init__(self):
        self.max_id, self.whole = int(self.ids.max()), set(self.bounds)

    def window(self, output, s: int, e: int, document: dict | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
        """Per-step losses ``[e - s]`` (float32, NaN where none) and their sum to differentiate; the user's
        loss may take the ``document`` (its name, text and fields) the steps belong to."""
        per_step = np.full(e - s, np.nan, np.float32)
        if self.kind == "next-token":
            if not is_next_token_logits(output, e - s, self.max_id):
                raise RnnscopeError(f"the model's output is {shape_of(output, e - s)}, not next-token logits "
                                    f"for {e - s} steps", SHAPE_FIX)
            logits, targets = first_tensor(output)[0], self.ids[s + 1:e + 1]
            ok = self.next_ok[s:e]
            n = int(ok.sum())
            if ok[:n].all():        # one document (always without carry): the same slice as a single pass
                loss = F.cross_entropy(logits[:n].float(), targets[:n], reduction="none")
                per_step[:n] = loss.detach().numpy()
            else:
                rows = torch.from_numpy(np.flatnonzero(ok))
                loss = F.cross_entropy(logits[rows].float(), targets[rows], reduction="none")
                per_step[rows.numpy()] = loss.detach().numpy()
            return per_step, loss.sum() if n else None
        value = self._user(output, s, e, document)
        if value.dim() == 1:
            per_step[:] = value.detach().float().numpy()
        return per_step, value.sum()

    def _user(self, output, s: int, e: int, document: dict | None) -> torch.Tensor:
        """The user's loss on steps ``s .. e-1``: ``[e - s]``, or a scalar over one whole document."""
        extra = {"document": document} if document is not None and takes_document(self.fn) else {}
        value = call_user(self.fn, output, self.ids[s:e], fix=USER_FIX, **extra,
                          doing=f"the loss failed on the model's output {shape_of(output, e - s)} and ids [{e - s}]")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise RnnscopeError(f"the loss returned {type(value).__name__}"
                                + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else ""), USER_FIX)
        if value.dim() == 0:
            if (s, e) not in self.whole:
                longest = max(b - a for a, b in self.bounds)
                raise RnnscopeError(f"the loss returned a scalar for steps {s}..{e - 1}, which are not one whole "
                                    "document", f"pass --chunk {longest} (or more) without --carry, or return "
                                    "a loss per step [T]")
            self.scalar = True
        elif value.dim() != 1 or len(value) != e - s:
            raise RnnscopeError(f"the loss returned shape {list(value.shape)} for {e - s} steps", USER_FIX)
        if torch.is_grad_enabled() and not value.requires_grad:     # else backward() fails deep in autograd
            raise RnnscopeError("the loss does not depend on the model's output (it has no gradient)",
                                "compute the loss from the output it is given (no .detach()), or probe without "
                                "--grad")
        return value


def resolve_loss(loss, output, steps: int, ids: torch.Tensor, next_ok: np.ndarray, bounds: list, *,
                 grad: bool, log=print) -> StepLoss | None:
    """The ``StepLoss`` for ``loss`` ("auto", None or ``fn(output, ids [T])``), judged on the dry run's
    ``output`` for the first ``steps`` ids; the user's loss is checked on each window it is given."""
    if loss is None:
        if grad:
            raise RnnscopeError("gradients need a loss, and loss is None", "pass a loss, or probe without --grad")
        return None
    if isinstance(loss, str):
        if loss != "auto":
            raise RnnscopeError(f"loss {loss!r} is not 'auto', None or a function", "pass loss='auto', None, or fn")
        if is_next_token_logits(output, steps, int(ids.max())):
            return StepLoss("next-token", ids, next_ok, bounds)
        problem = f"the model's output is {shape_of(output, steps)}, not next-token logits"
        if grad:
            raise RnnscopeError(problem, SHAPE_FIX)
        log(f"probe: note: {problem}; recording states only (--loss file.py:fn gives a loss)")
        return None
    if not callable(loss):
        raise RnnscopeError(f"loss is a {type(loss).__name__}", "pass loss='auto', None, or fn(output, ids) -> [T]")
    return StepLoss("user", ids, next_ok, bounds, loss)
