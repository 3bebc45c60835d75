"""Where a cell's steps are kept while it runs: preallocated blocks, one row of every kind per step.

A step loop hands over one step at a time, and keeping each step's tensors in lists (then stacking
them) costs per step more than the step itself at batch 1: a Python object and a list entry per
kind, objects the garbage collector keeps scanning, and a stack of every step at the end. Here a
step is one ``torch.cat`` into the next row of a block ``[steps, batch, width]`` whose width holds
every kind side by side; blocks double (16 steps, then 32, ... up to ``MAX_BLOCK_BYTES``), so
no more is unused than is used, and nothing is ever copied to grow. A kind is read out as
``[batch, time, units]``, a fresh tensor, once per read.

The gradients are one zeroed ``[steps, batch, width]`` tensor made when the first one arrives (the
forward has run by then), that each step's hooks add into at their own step: a second backward
accumulates, as ``.grad`` does, and a step no gradient reached reads zeros.
"""
from __future__ import annotations

import functools

import torch

from .cellstep import _rows

# 64 MiB: a block of 1,024 steps of six 512-unit kinds at batch 8; past that, more blocks cost
# nothing measurable, while a larger one could leave hundreds of MiB unused at the end of a loop
MAX_BLOCK_BYTES = 64 << 20
FIRST_BLOCK = 16


def _widest(dtypes: list[torch.dtype]) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes)


def _copy(v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh contiguous copy (of a view into a buffer the probe keeps writing), in ``dtype``."""
    out = torch.empty(v.shape, dtype=dtype or v.dtype, device=v.device)
    return out.copy_(v)


class StepRows:
    """Every step of a fixed set of kinds, ``batch`` rows each (a step with fewer rows leaves the
    last ones NaN): ``add(parts)`` one step, ``kind(name)`` -> ``[batch, time, units]``."""

    def __init__(self, kinds: list[str], first: list[torch.Tensor], batch: int, device: torch.device):
        """``first``: the first step's tensors, in ``kinds`` order (their units and dtypes)."""
        self.kinds, self.batch, self.steps, self.device = list(kinds), batch, 0, device
        self.widths = [v.shape[-1] for v in first]
        self.dtypes = [v.dtype for v in first]
        # one buffer dtype for all (the widest; an upcast is exact, read back to each kind's own)
        self.dtype = _widest(self.dtypes) if first else torch.float32
        self.offsets = [sum(self.widths[:i]) for i in range(len(first))]
        self.width = sum(self.widths)
        self.blocks: list[torch.Tensor] = []
        self.used = 0               # rows written in the last block
        self.shrinks: list[tuple[int, int]] = []        # (step, rows) each time the batch shrank

    def _block(self) -> torch.Tensor:
        last = self.blocks[-1] if self.blocks else None
        if last is None or self.used == last.shape[0]:
            per_step = max(1, self.batch * self.width * torch.empty((), dtype=self.dtype).element_size())
            n = FIRST_BLOCK if last is None else min(2 * last.shape[0], max(1, MAX_BLOCK_BYTES // per_step))
            self.blocks.append(torch.empty(n, self.batch, self.width, dtype=self.dtype, device=self.device))
            self.used = 0
        return self.blocks[-1]

    def add(self, parts: list[torch.Tensor], b: int) -> int:
        """One step of ``b <= batch`` rows: ``parts`` in ``kinds`` order, each ``[b, units]`` (or
        unbatched). Returns the step's index."""
        if b < self.batch and (not self.shrinks or self.shrinks[-1][1] != b):
            self.shrinks.append((self.steps, b))
        if parts:
            row = self._block()[self.used]
            if b < self.batch:
                row[b:] = float("nan")
                row = row[:b]
            parts = [_rows(v) for v in parts] if parts[0].dim() == 1 else parts
            grad = torch.is_grad_enabled()
            # a copy of values (the step's own graph is the caller's); what torch.no_grad() does,
            # at a third of its cost per step
            torch._C._set_grad_enabled(False)
            try:
                torch.cat(parts, 1, out=row)
            finally:
                torch._C._set_grad_enabled(grad)
            self.used += 1
        self.steps += 1
        return self.steps - 1

    def kind(self, name: str) -> torch.Tensor:
        """``[batch, time, units]`` of one kind, in its own dtype."""
        i = self.kinds.index(name)
        o, w = self.offsets[i], self.widths[i]
        if len(self.blocks) == 1:
            return _copy(self.blocks[0][:self.steps, :, o:o + w].transpose(0, 1), self.dtypes[i])
        out = torch.empty(self.batch, self.steps, w, dtype=self.dtypes[i], device=self.device)
        t = 0
        for blk in self.blocks:
            n = min(blk.shape[0], self.steps - t)
            out[:, t:t + n] = blk[:n, :, o:o + w].transpose(0, 1)
            t += n
        return out


class StepGrads:
    """dL/d(state) of every step of one sequence, one ``[steps, batch, units]`` tensor per state
    (rows past a step's batch NaN, as its states read); ``add`` is what each step's hooks call."""

    def __init__(self, rows: StepRows, states: dict[str, tuple[int, torch.dtype]]):
        """``rows``: the sequence's steps (their count, batch and shrinks); ``states``: kind -> (units, dtype)."""
        self.rows, self.states = rows, states
        self.g: dict[str, torch.Tensor] | None = None         # None until a gradient arrives

    def emptied(self) -> "StepGrads":
        """The same layout with no gradient yet."""
        return StepGrads(self.rows, self.states)

    def _room(self, t: int) -> dict[str, torch.Tensor]:
        """The buffers, made or grown to hold step ``t`` (a backward between steps of one sequence)."""
        have = 0 if self.g is None else next(iter(self.g.values())).shape[0]
        if t >= have:
            rows, old = self.rows, self.g
            self.g = {}
            for k, (units, dtype) in self.states.items():
                g = torch.zeros(max(rows.steps, t + 1), rows.batch, units, dtype=dtype, device=rows.device)
                for step, b in rows.shrinks:
                    g[step:, b:] = float("nan")
                if old is not None:
                    g[:have] = old[k]
                self.g[k] = g
        return self.g

    def add(self, kind: str, t: int, grad: torch.Tensor) -> None:
        """A hook's dL/d(state) at step t, added to what earlier backwards left there (the grad
        detached, so a ``create_graph`` backward builds no graph on the buffer)."""
        grad = _rows(grad.detach())
        row = self._room(t)[kind][t]
        (row if grad.shape[0] == row.shape[0] else row[:grad.shape[0]]).add_(grad)

    def kind(self, kind: str) -> torch.Tensor:
        """``[batch, time, units]`` (after at least one gradient reached the sequence)."""
        T = self.rows.steps
        return _copy(self._room(T - 1)[kind][:T].transpose(0, 1))
