"""``Watch``: gradient flow through time while a network trains, into an append-only watch log.

    watch = rs.Watch(model, out="runs/train", every=100)
    for step, (x, y) in enumerate(batches):
        with watch.step(step):
            loss = loss_fn(model(x), y)
            loss.backward()
            watch.loss(loss)
        watch.clip_grad_norm_(model.parameters(), 1.0)     # or torch's, then watch.clipped(norm, 1.0)
        opt.step(); opt.zero_grad()

On a watched step (``step % every == 0``) the model runs inside ``Probe(grad=True)``: the user's own
backward gives the exact ``dL/dh_t`` and ``dL/dc_t`` of every layer. The decay with lag is for the
loss at the last timestep alone: when the backward reaches each module's output, a hook sends the
gradient at the last step alone back through the recorded graph once more (a second adjoint over
the recorded gates, about the cost of the recurrent part of one backward), and what that adds to
the probe's records is taken and the records put back as they were. On other steps nothing is
installed: ``step()`` is a modulo and a comparison. The rows are buffered and written as one block
every ``flush_every`` watched steps, on ``close()`` and at interpreter exit
(``rnnscope.store.watchlog``), so a kill loses at most one block.
"""
from __future__ import annotations

import atexit
import math
import numbers
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rnnscope.errors import RnnscopeError
from rnnscope.store.watchlog import GATES, SCHEMAS, WatchLogWriter

from . import families
from .keys import recurrent_modules, state_key
from .probe import Probe
from .recording import model_checksum

# Karpathy et al. 2015 call a sigmoid gate saturated below 0.1 or above 0.9 (analysis.gates uses the
# same); a tanh output is the same test on the same pre-activation: tanh(a) = 2 sigmoid(2a) - 1, so |h| > 0.8
LOW, HIGH, TANH = 0.1, 0.9, 0.8


def step_norms(grad: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``grad [batch, time, units]`` -> per timestep, the batch mean and the batch max of ``||grad[b, t]||``."""
    n = torch.linalg.vector_norm(grad.detach().double(), dim=2)
    return n.mean(0).cpu().numpy(), n.amax(0).cpu().numpy()


def decay_curve(grad: torch.Tensor) -> np.ndarray:
    """``grad [batch, time, units]`` of the loss at the last step -> ``norm[lag]``, lag ``k`` = step ``T-1-k``:
    the batch mean of ``||grad[b, T-1-k]||`` over its value at lag 0 (NaN when that is 0)."""
    mean = torch.linalg.vector_norm(grad.detach().double(), dim=2).mean(0).flip(0).cpu().numpy()
    return mean / mean[0] if mean[0] > 0 else np.full_like(mean, np.nan)


def half_life(norm: np.ndarray) -> float:
    """The lag (linearly interpolated) where ``norm`` first falls below 0.5; NaN if it never does."""
    below = np.flatnonzero(norm < 0.5)
    if not len(below) or below[0] == 0:
        return float("nan")
    k = int(below[0])
    a, b = norm[k - 1], norm[k]
    return float(k - 1 + (a - 0.5) / (a - b))


def saturation(family, st: dict) -> dict:
    """The fraction of saturated values of each gate kind of one direction, ``sat_*`` (NaN where absent)."""
    out = dict.fromkeys(GATES, float("nan"))
    for g in family.gate_order:
        if f"sat_{g}" in out and g in st:
            v = st[g]
            out[f"sat_{g}"] = float(((v < LOW) | (v > HIGH)).double().mean())
    if family is families.RNN and "h" in st:
        out["sat_h"] = float((st["h"].abs() > TANH).double().mean())
    return out


def _layer_params(m: nn.Module, layer: int, reverse: bool) -> list[nn.Parameter]:
    suffix = f"_l{layer}{'_reverse' if reverse else ''}"
    return [p for n, p in m.named_parameters(recurse=False) if n.endswith(suffix)]


def _norm(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
        if grads else 0.0


def step_tables(model: nn.Module, modules: dict, probe: Probe, decay: dict, step: int) -> dict:
    """The timesteps, decay and layers rows of a watched step from ``probe``'s records and the
    parameters' gradients as they are now; ``decay``: key -> gradient of the last step's loss ``[B, T, units]``."""
    trace = probe.trace
    ts, dec, lay = [], [], []
    for name, m in modules.items():
        fam = families.of(m)
        for layer in range(m.num_layers):
            for reverse in (False, True)[:2 if m.bidirectional else 1]:
                prefix = state_key(name, layer, reverse, "h")[:-2]
                row = {"step": step, "key": prefix, "half_life": float("nan"),
                       "param_grad_norm": _norm(_layer_params(m, layer, reverse))}
                call = next((c for c in reversed(probe.calls) if f"{prefix}.h" in c), None)
                if call is not None:
                    d = call.direction(f"{prefix}.h")
                    row.update(saturation(fam, {k: d.get(k) for k in fam.kinds if k in d.st}))
                for kind in fam.grad_kinds:
                    key = f"{prefix}.{kind}"
                    try:
                        mean, mx = step_norms(trace[key])
                    except (KeyError, RnnscopeError):
                        continue            # this module did not run, or no gradient reached it
                    T = len(mean)
                    ts += [{"step": step, "key": key, "t": t, "lag": T - 1 - t, "mean": float(mean[t]),
                            "max": float(mx[t])} for t in range(T)]
                    if key in decay:
                        norm = decay_curve(decay[key])
                        dec += [{"step": step, "key": key, "lag": k, "norm": float(v)} for k, v in enumerate(norm)]
                        if kind == "grad_h":
                            row["half_life"] = half_life(norm)
                lay.append({g: float("nan") for g in GATES} | row)
    grad_norm = _norm(model.parameters())
    return {"timesteps": ts, "decay": dec, "layers": lay, "grad_norm": grad_norm}


def steps_row(row: dict, grad_norm: float, backwards: bool, clips: int = 0) -> dict:
    """The steps table's row of a watched step: ``row`` holds its step, wall, loss (or None) and clip
    (``(norm before, max_norm)`` or None); ``grad_norm``: the global norm measured after its backward;
    ``clips``: clipping events on every step since the previous watched one, this one included."""
    loss = float("nan") if row["loss"] is None else row["loss"]
    before = grad_norm if row["clip"] is None else row["clip"][0]
    clipped = row["clip"] is not None and before > row["clip"][1]
    # torch scales by max_norm / (norm + 1e-6) when that is below 1
    after = before * min(1.0, row["clip"][1] / (before + 1e-6)) if row["clip"] is not None else before
    flags = [f for f, on in (("nonfinite_loss", row["loss"] is not None and not math.isfinite(loss)),
                             ("nonfinite_grad", not math.isfinite(before)), ("step_backwards", backwards)) if on]
    return {"step": row["step"], "wall": row["wall"], "loss": loss, "loss_finite": math.isfinite(loss),
            "grad_norm": before, "grad_norm_after": after, "clipped": bool(clipped), "clips": int(clips),
            "flags": ",".join(flags)}


class LastStep:
    """While a watched step runs: the loss at the last step alone, sent back from each recurrent
    module's output (``decay``: key -> ``[batch, time, units]``), apart from the loop's own backward."""

    def __init__(self, model: nn.Module, probe: Probe, modules: dict):
        self.model, self.probe, self.inner = model, probe, False
        self.decay: dict[str, torch.Tensor] = {}
        self.latest: dict[nn.Module, object] = {}
        self.hooks = [m.register_forward_hook(self.seed) for m in modules.values()]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def seed(self, module, args, output):
        out = output[0]
        if isinstance(out, PackedSequence) or not out.requires_grad:
            return                                  # no single last step to seed from
        call = self.probe.calls[-1]
        self.latest[module] = call            # a module called again in this step: its last call is seeded
        t_dim = 1 if module.batch_first and out.dim() == 3 else 0
        out.register_hook(lambda grad: self._backward(module, out, grad, t_dim, call))

    def _backward(self, module, out, grad, t_dim, call) -> None:
        """The loss at the last step alone, sent back from this module's output through the recorded graph;
        the probe's records keep only the loop's own gradients."""
        if self.inner or self.latest.get(module) is not call:     # the hook sees its own seed too
            return
        seed = torch.zeros_like(grad)
        seed.select(t_dim, -1).copy_(grad.select(t_dim, -1))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.inner = True
        try:
            self.decay.update(self.probe.gradients_apart(out, seed, params, call))
        finally:
            self.inner = False


def flush_rows(log: WatchLogWriter, rows: list[dict]) -> list:
    """Append the buffered watched steps' rows to ``log`` as one block; returns the empty buffer."""
    if rows:
        log.append({name: pd.DataFrame([r for row in rows for r in row[name]], columns=SCHEMAS[name].names)
                    for name in SCHEMAS})
    return []


def open_log(model: nn.Module, modules: dict, out, every: int) -> WatchLogWriter:
    """The log a Watch writes: created, or continued when it holds this model's log."""
    info = {n: {"type": families.family_name(m), "layers": m.num_layers, "hidden": m.hidden_size,
                "bidirectional": m.bidirectional} for n, m in modules.items()}
    keys = [state_key(n, layer, d == 1, k) for n, m in modules.items() for layer in range(m.num_layers)
            for d in range(2 if m.bidirectional else 1) for k in families.of(m).grad_kinds]
    return WatchLogWriter(out, every, {"class": type(model).__name__, "checksum": model_checksum(model),
                                       "modules": info}, keys)


class Watch:
    """Record gradient flow through time every ``every`` steps of a training loop into the log ``out``.

    Args: ``model`` (with at least one nn.RNN / nn.LSTM / nn.GRU); ``out``: the log folder (created, or
    continued when it holds this model's log); ``every``: watch steps with ``step % every == 0``;
    ``flush_every``: watched steps per block on disk.
    Use ``with watch.step(step):`` around forward and backward (``watch.loss(loss)`` inside), or
    ``watch.before(step)`` ... ``watch.after(loss)`` from callbacks; then ``watch.clip_grad_norm_`` or
    ``watch.clipped(norm, max_norm)``; ``watch.close()`` (or ``with Watch(...) as watch:``) at the end.
    """

    def __init__(self, model: nn.Module, out="runs/train", every: int = 100, flush_every: int = 10):
        if not isinstance(every, int) or every < 1 or not isinstance(flush_every, int) or flush_every < 1:
            raise RnnscopeError(f"every={every!r}, flush_every={flush_every!r}", "pass positive integers")
        self.model, self.every, self.flush_every = model, every, flush_every
        self._clips = 0             # clipping events since the last watched step's row
        self.modules = recurrent_modules(model)
        if not self.modules:
            raise RnnscopeError(f"{type(model).__name__} has no nn.RNN, nn.LSTM or nn.GRU submodule to watch",
                                "watch a model built from PyTorch's recurrent modules")
        self.log = open_log(model, self.modules, out, every)
        self.path = self.log.path
        self._start = self.log.manifest["created"]     # wall time counts from the log's start
        self._last = self.log.last_step            # the largest step seen: a smaller one is flagged
        self._backwards = False
        self._probe: Probe | None = None
        self._seeds: LastStep | None = None
        self._row: dict | None = None              # the watched step whose clipping may still come
        self._rows: list[dict] = []
        atexit.register(self.close)

    def __repr__(self) -> str:
        state = "closed" if self.log is None else f"last step {self._last}"
        keys = self.log.manifest.get("keys", []) if self.log else []
        return f"Watch({str(self.path)!r}, every={self.every}: {len(keys)} keys {keys[:6]}; {state})"

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the loop's side

    @contextmanager
    def step(self, step: int):
        """Around one training step's forward and backward."""
        self.before(step)
        try:
            yield self
        finally:
            self.after()

    def before(self, step: int) -> bool:
        """A training step begins; returns whether it is watched."""
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise RnnscopeError(f"step {step!r} is not a whole number >= 0", "pass the loop's step counter")
        step = int(step)
        if self._probe is not None:
            self.after()
        self._commit()
        if self._last is not None and step <= self._last:
            self._backwards = True                 # kept for the next watched step's flags
        self._last = step if self._last is None else max(self._last, step)
        if step % self.every:
            return False
        self._row = {"step": step, "wall": time.time() - self._start, "loss": None, "clip": None, "tables": None}
        self._probe = Probe(self.model, grad=True).__enter__()
        self._seeds = LastStep(self.model, self._probe, self.modules)
        return True

    def loss(self, loss) -> None:
        """The step's loss (a tensor or a number); a non-finite one is recorded and flagged."""
        if self._row is not None:
            self._row["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def after(self, loss=None) -> None:
        """The step's backward is done (the callback form passes its loss here)."""
        if loss is not None:
            self.loss(loss)
        if self._probe is None:
            return
        try:
            if self._row["tables"] is None:
                self._take_tables()
        finally:
            self._seeds.remove()
            probe, self._probe = self._probe, None
            probe.__exit__(None, None, None)

    def clip_grad_norm_(self, parameters, max_norm: float, **kwargs) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_``, with the norms before and after recorded on watched steps."""
        parameters = list(parameters)
        if self._row is not None and self._row["tables"] is None and self._probe is not None:
            self._take_tables()                    # the layers' norms before clipping scales them
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, **kwargs)
        self.clipped(norm, max_norm)
        return norm

    def clipped(self, total_norm_before, max_norm: float) -> None:
        """Clipping ran on this step: ``total_norm_before`` as torch's ``clip_grad_norm_`` returned it.
        Called on every step, watched or not: the events between watched steps are counted (a float compare)."""
        before = float(total_norm_before)
        self._clips += not before <= max_norm          # a NaN norm counts: torch scales by NaN then
        if self._row is not None:
            self._row["clip"] = (float(total_norm_before), float(max_norm))

    def close(self) -> None:
        """Write what is buffered and release the log. Called at exit too; a second call does nothing."""
        if self.log is None:
            return
        try:
            self.after()
            self._commit()
            self.flush()
        finally:
            self.log.close()
            self.log = None
            atexit.unregister(self.close)

    def flush(self) -> None:
        self._rows = flush_rows(self.log, self._rows)

    # inside

    def _take_tables(self) -> None:
        self._row["tables"] = step_tables(self.model, self.modules, self._probe, self._seeds.decay, self._row["step"])

    def _commit(self) -> None:
        """The pending watched step's row is final (the next step began, or the log closes)."""
        row, self._row = self._row, None
        if row is None or row["tables"] is None:
            return
        self._rows.append({**row["tables"], "steps": [steps_row(row, row["tables"]["grad_norm"], self._backwards,
                                                                  self._clips)]})
        self._backwards, self._clips = False, 0
        if len(self._rows) >= self.flush_every:
            self.flush()
