"""``Probe``: record every state, gate and gradient of every recurrent submodule of a model.

While the ``with`` block is open, each ``nn.RNN / nn.LSTM / nn.GRU`` runs through the layer
engine (``probe.engine``), which calls the probe for each layer it does not edit: the module's
own fused kernel runs one layer at a time, which returns the same outputs and exposes every
layer's states; an LSTM on oneDNN has its gates and cells read from the kernel's workspace
(``probe.workspace``), the rest are replayed from the layer's outputs (``probe.replay``); with
state gradients each direction is a ``RecordedDirection`` whose backward is the adjoint
recurrence. Layers an Intervention edits are recorded by the engine as it steps through them.
Cells (``nn.LSTMCell`` and the rest, or modules declared with ``probe.cells.cell``) are recorded
one step per call by ``probe.cells``. On exit each module's ``forward`` is restored; nothing else
is touched.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rnnscope.errors import RnnscopeError

from . import attention as attention_steps, cells, engine, families, packed, workspace
from .autograd import RecordedDirection
from .engine import Direction, Flow
from .keys import recurrent_modules, state_key
from .replay import direction_params


class CallTrace(Mapping):
    """The states of one forward call of one recurrent module: ``trace[key] -> [batch, time, units]``."""

    def __init__(self):
        self._dirs: dict[str, tuple[Direction, str]] = {}

    def _add(self, key: str, d: Direction, kind: str) -> None:
        self._dirs[key] = (d, kind)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._dirs:
            raise KeyError(f"{key!r} was not recorded; recorded keys: {', '.join(list(self._dirs)[:8])} ...")
        d, kind = self._dirs[key]
        return d.get(kind).transpose(0, 1)

    def __iter__(self):
        return iter(self._dirs)

    def __len__(self) -> int:
        return len(self._dirs)

    def __repr__(self) -> str:
        return _shapes("CallTrace", self)

    def direction(self, key: str) -> Direction:
        """The engine's record of the layer and direction ``key`` belongs to (``.st``: its states and gates)."""
        return self._dirs[key][0]


class Trace(Mapping):
    """Every call of a ``Probe`` block, each key's calls concatenated along time
    (``[batch, time, units]``): one continuous sequence when the caller carries state between
    calls. ``probe.calls`` holds each module call on its own, in order."""

    def __init__(self, calls: list[CallTrace]):
        self._calls = calls

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = [c[key] for c in self._calls if key in c]
        if not parts:
            raise KeyError(key)
        if len({p.shape[0] for p in parts}) > 1:
            raise RnnscopeError(f"calls recorded with different batch sizes cannot be joined along time for {key}",
                                "read each call from probe.calls[i] (a cell's sequences: probe.cell_calls[i])")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def __iter__(self):
        seen = {}
        for c in self._calls:
            seen.update(dict.fromkeys(c))
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return _shapes(f"Trace of {len(self._calls)} call(s)", self)


def _shapes(what: str, trace: Mapping) -> str:
    """``what`` and each key with its shape ``[batch, time, units]``, as a cache's repr shows its hooks."""
    lines = [f"  {k}: [{', '.join(map(str, trace[k].shape))}]" for k in list(trace)[:40]]
    more = f"\n  ... and {len(trace) - 40} more" if len(trace) > 40 else ""
    return f"{what}: {len(trace)} keys" + ("\n" + "\n".join(lines) if lines else "") + more


class Probe:
    """``with Probe(model, grad=True) as probe: ...`` records every recurrent submodule, and every
    cell of a step loop one step per call (``probe.cells``: keys ``{cell}.l0.{kind}``).

    ``kinds``: the state kinds to keep (default all; ``h`` always, as the others derive from it).
    ``carry``: a call made with no initial state starts from where the module's previous call in
    this block ended, so a long text can be fed in chunks and read as one sequence.
    ``param_grads=False`` (with ``grad=True``): parameters are frozen inside the block, so
    ``backward()`` computes state gradients only, faster, and leaves every ``.grad`` untouched.
    ``attention``: modules whose weights over the source to keep at every call (``{name: picker or
    None}`` or a list of names; see ``probe.attention``): ``probe.attention[name] -> [batch, steps, source]``.
    Inside or around an ``Intervention`` it records the edited model.
    """

    def __init__(self, model: nn.Module, grad: bool = False, kinds=None, carry: bool = False,
                 param_grads: bool = True, attention=None):
        self.model, self.grad, self.carry, self.param_grads = model, grad, carry, param_grads
        self.overridden: set[str] = set()     # modules whose call passed its own state where one was carried
        self.kinds = None if kinds is None else set(kinds) | {"h"}
        self.modules = recurrent_modules(model)
        self.cells = cells.cell_modules(model)
        if not self.modules and not self.cells:
            raise RnnscopeError(f"{type(model).__name__} has no nn.RNN, nn.LSTM or nn.GRU submodule to probe, nor a "
                                "cell (nn.RNNCell, nn.LSTMCell, nn.GRUCell)",
                                "probe a model built from PyTorch's recurrent modules, or declare its own cell "
                                "with rnnscope.cell")
        self.attention = attention_steps.Attention(model, attention)
        self.calls: list[CallTrace] = []
        self.cell_calls: list[cells.CellCall] = []      # each sequence of each cell, in the order they began
        self._tapes: list[cells.CellTape] = []
        self._last_state: dict[str, object] = {}
        self._saved: dict[nn.Parameter, bool] = {}

    @property
    def trace(self) -> Trace:
        return Trace(self.calls + self.cell_calls)

    def __repr__(self) -> str:
        what = f"grad={self.grad}, kinds={sorted(self.kinds) if self.kinds else 'all'}, carry={self.carry}"
        mods = "\n".join([f"  {n or '<model>'}: {type(m).__name__}({m.input_size}, {m.hidden_size}, "
                          f"layers={m.num_layers}{', bidirectional' if m.bidirectional else ''})"
                          for n, m in self.modules.items()] +
                         [f"  {n or '<model>'}: {type(m).__name__} (a cell: one step per call)"
                          for n, m in self.cells.items()] +
                         [f"  {n}: attention, {len(self.attention.sequences(n))} sequence(s)" for n in self.attention])
        return f"Probe({what}; {len(self.calls)} call(s), {len(self.cell_calls)} cell sequence(s) recorded)\n{mods}"

    def gradients_apart(self, output: torch.Tensor, grad_output: torch.Tensor, inputs, call: CallTrace) -> dict:
        """One more backward, from ``output`` with ``grad_output``, to ``inputs``: returns ``call``'s
        state gradients from that backward alone (key -> ``[batch, time, units]``), while every record
        keeps only the gradients of the ordinary backward (``Watch`` sends the last step's loss back so)."""
        dirs = {id(d): d for c in self.calls for d, _ in c._dirs.values()}.values()
        saved = [(d, d.swap_grads({})) for d in dirs] + [(c, c.swap_grads()) for c in self.cell_calls]
        try:
            torch.autograd.grad(output, inputs, grad_outputs=grad_output, retain_graph=True, allow_unused=True)
            return {key: call[key].clone() for key in call if ".grad_" in key}
        finally:
            for d, grads in saved:
                d.swap_grads(grads)

    def __enter__(self) -> "Probe":
        cells.check(self.cells)              # checks before touching anything: a refusal leaves the model as it was
        engine.join(self.modules, self)
        self._tapes = cells.join(self.cells, self)
        self.attention.join()
        if not self.param_grads:
            self._saved = {p: p.requires_grad for p in self.model.parameters()}
            for p in self._saved:
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        engine.leave(self.modules, self)
        cells.leave(self._tapes)
        self.attention.leave()
        for p, flag in self._saved.items():
            p.requires_grad_(flag)
        self._saved = {}

    def reset(self) -> None:
        """With ``carry``: the next call of each module starts from zeros again (a new document)."""
        self._last_state.clear()

    def clear(self) -> None:
        """Drop every call recorded so far (``record`` has written it); each cell starts a new sequence."""
        self.calls.clear()
        self.cell_calls.clear()
        self.attention.clear()
        cells.restart(self._tapes)

    def carry_from(self, step: int) -> None:
        """With ``carry``: the next call of each module starts from the state after ``step`` (an index
        into its latest call) instead of its end: ``record`` reads ahead past a chunk for gradients."""
        for name, m in self.modules.items():
            call = next((c for c in reversed(self.calls) if any(k.startswith(f"{name}.l" if name else "l")
                                                                   for k in c)), None)
            if call is None:
                continue
            D = 2 if m.bidirectional else 1
            recs = [call.direction(state_key(name, layer, d == 1, "h")) for layer in range(m.num_layers)
                    for d in range(D)]
            h = torch.stack([r.st["h"][step] for r in recs])
            self._last_state[name] = (h, torch.stack([r.st["c"][step] for r in recs])) \
                if families.of(m).cell_state else h

    def begin(self, name: str, m: nn.Module, x: torch.Tensor, hx, unbatched: bool):
        """The engine starts a call of module ``name`` on ``x [T, B, in]``: returns ``(x, h0, c0, call)``
        with ``h0, c0 [L*D, B, *]`` the caller's, carried from the previous call, or zeros."""
        if hx is not None and self.carry and name in self._last_state:
            self.overridden.add(name)           # the caller's own state wins; ``record`` refuses to go on
        if hx is None and self.carry and name in self._last_state:
            hx = self._last_state[name]
            prev_b = (hx[0] if isinstance(hx, tuple) else hx).shape[1]
            if prev_b != x.shape[1]:
                raise RnnscopeError(f"{name}: carried state has batch {prev_b}, this call has batch {x.shape[1]}",
                                    "keep the batch size fixed while carrying state, or pass hx")
            h0, c0 = hx if families.of(m).cell_state else (hx, None)
        else:
            h0, c0 = engine.initial_state(m, x, hx, unbatched)
        call = CallTrace()
        self.calls.append(call)
        if self.grad and not self.param_grads and torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()     # a leaf, so gradients reach the states with frozen weights
        return x, h0, c0, call

    def keep(self, call: CallTrace, name: str, layer: int, family, dirs) -> None:
        for rec in dirs:
            for k in family.kinds:
                if k in rec.st and (self.kinds is None or k in self.kinds):
                    call._add(state_key(name, layer, rec.reverse, k), rec, k)
            if self.grad:
                for k in family.grad_kinds:
                    call._add(state_key(name, layer, rec.reverse, k), rec, k)

    def end(self, name: str, family, h_ns: list, c_ns: list) -> None:
        if self.carry:          # kept in the batched layout, whatever the caller's
            h_n = torch.cat(h_ns, 0).detach()
            self._last_state[name] = (h_n, torch.cat(c_ns, 0).detach()) if family.cell_state else h_n

    def record_layer(self, run: engine.Layer, differentiable: bool):
        """The engine's recording strategy for one unedited layer; see ``recorded_layer``."""
        return recorded_layer(run.module, run.family, run.layer, run.flow, run.h0, run.c0, run.dirs,
                              differentiable, only_h=self.kinds == {"h"})


def recorded_layer(m, family, layer, flow: Flow, h0, c0, dirs, differentiable: bool, only_h: bool = False):
    """One layer, ``h0, c0 [D, B, *]``, its states into ``dirs``. With state gradients each direction
    runs padded through ``RecordedDirection``. Otherwise an LSTM on oneDNN runs padded and is read
    from its workspace (packed input only with grad mode off: there it is faster than PyTorch's
    packed kernel, and each sequence's c_n is read at its end, not traced; ``only_h`` on padded
    input: the plain kernel's outputs are all that is kept); else the fused kernel runs on the
    layer (packed where the input is; autograd as usual for the caller's own backward) and the
    states are replayed without a graph. Returns ``(Flow, h_n, c_n or None)``."""
    if differentiable:
        out, h_n, c_n = _differentiable_layer(m, layer, flow.padded(), h0, c0, dirs)
        return Flow(out, None, flow.packing), h_n, c_n
    if family is families.LSTM and (not only_h if flow.packing is None else not torch.is_grad_enabled()):
        done = _workspace_layer(m, layer, flow.padded(), h0, c0, dirs)
        if done is not None:
            return Flow(done[0], None, flow.packing), done[1], done[2]
    out, h_n, c_n = engine.fused_layer(m, layer, flow, h0, c0)
    _replay(m, family, layer, flow.padded(), out.padded(), dirs, only_h)
    return out, h_n, c_n


def _differentiable_layer(m, layer, x, h0, c0, dirs):
    """Each direction through ``RecordedDirection``, whose backward is the adjoint recurrence."""
    outs, h_ns, c_ns = [], [], []
    for d, rec in enumerate(dirs):
        p = direction_params(m, layer, rec.reverse)
        out, h_n, c_n = RecordedDirection.apply(rec, rec.along(x), h0[d], c0[d] if c0 is not None else None,
                                                p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr)
        outs.append(rec.along(out))
        h_ns.append(h_n)
        c_ns.append(c_n)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
    return out, torch.stack(h_ns), (torch.stack(c_ns) if c0 is not None else None)


def _replay(m, family, layer, x, out, dirs, only_h=False):
    """Each direction's states replayed without a graph from the layer's input ``x`` and outputs
    ``out [T, B, D*P]`` (time order; ``rec.along`` gives its processing order); only ``h`` with ``only_h``."""
    P = getattr(m, "proj_size", 0) or m.hidden_size
    with torch.no_grad():
        for d, rec in enumerate(dirs):
            xd, hd = rec.along(x.detach()), rec.along(out[..., d * P:(d + 1) * P].detach())
            rec.st = {"h": hd} if only_h else family.replay(direction_params(m, layer, rec.reverse), xd, hd,
                                                             rec.h0, rec.c0)


def _workspace_layer(m, layer, x, h0, c0, dirs):
    """``recorded_layer`` for an LSTM layer whose gates and cells oneDNN's workspace holds:
    each direction through the fused kernel on its own (the reverse one on its reversed input, so
    its states come in processing order), or None when the workspace cannot be read. Padded packed
    input (``rec.ends`` set, no graph): each sequence's final state is at its own end."""
    outs, h_ns, c_ns, sts = [], [], [], []
    for d, rec in enumerate(dirs):
        p = direction_params(m, layer, rec.reverse)
        xd = rec.along(x)
        if not workspace.usable(xd, p):
            return None
        res = workspace.lstm_forward(p, xd, h0[d], c0[d], graph=torch.is_grad_enabled())
        if res is None:
            return None
        out, h_n, c_n, st = res
        if rec.ends is not None:
            h_n, c_n = packed.at_ends(out, rec.ends), packed.at_ends(st["c"], rec.ends)
        outs.append(rec.along(out))
        h_ns.append(h_n)
        c_ns.append(c_n)
        sts.append(st)
    for rec, st in zip(dirs, sts):
        rec.st = st
    return (outs[0] if len(outs) == 1 else torch.cat(outs, -1)), torch.stack(h_ns), torch.stack(c_ns)
