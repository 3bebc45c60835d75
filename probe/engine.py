"""The layer engine: the one forward of every recurrent module that a Probe or an Intervention touches.

While anyone is registered (``join``), a module's ``forward`` is its ``Engine``'s: one instance
attribute, removed when the last one leaves (``leave``). The engine runs the module layer by layer
and direction by direction, in the time-major layout ``[T, B, *]`` (batch-first and unbatched
input converted at the edges), from the caller's, the carried or zero initial states, on padded
or ``PackedSequence`` input, with dropout between layers, and returns outputs and final states
in PyTorch's own layout. For each layer it calls one strategy:

* edited (an Intervention edits a state of this layer): each direction step by step, with the
  family's cell equations (``probe.families``) and the edits applied as each state is computed.
  A Probe registered too records the edited states and, through zero perturbations added to
  each ``h_t`` and ``c_t``, their gradients from autograd;
* recorded (a Probe): the recorder's own strategy (oneDNN's workspace, the replay, or
  ``RecordedDirection`` with its adjoint backward; ``probe.probe``);
* otherwise the fused kernel on the whole layer.

So recording and editing compose in either nesting order: a Probe records the edited model.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnscope.errors import RnnscopeError

from . import families, packed
from .replay import direction_params, layer_weights


class Direction:
    """One direction of one layer in one call: its states in processing order (``st``, filled by
    the layer's strategy) and, after backward, their gradients."""

    def __init__(self, module, layer, reverse, h0, c0, packing=None):
        self.module, self.layer, self.reverse = module, layer, reverse
        self.h0, self.c0 = h0, c0
        # packed input: per-sequence time reversal, steps past each end, each sequence's last step
        self.order = packing.rev if packing is not None and reverse else None
        self.gone = packing.gone if packing is not None else None
        self.ends = packing.ends if packing is not None else None
        self.st: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    def swap_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put ``grads`` in place of the gradients gathered so far, and return those."""
        old, self._grads = self._grads, grads
        return old

    def add_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """Called from backward; a second backward through the same graph accumulates, as ``.grad`` does."""
        for k, v in grads.items():
            self._grads[k] = v.detach() if k not in self._grads else self._grads[k] + v.detach()

    def get(self, kind: str) -> torch.Tensor:
        """``[T, B, units]`` in time order, NaN past each packed sequence's end."""
        if kind.startswith("grad_"):
            if kind not in self._grads:
                raise RnnscopeError("no gradient has reached the probed module yet",
                                    "call loss.backward() on a loss computed inside the Probe(grad=True) block")
            t = self._grads[kind]
        else:
            t = self.st[kind]
        t = self.along(t)
        return t if self.gone is None else t.masked_fill(self.gone.unsqueeze(-1), float("nan"))

    def along(self, t: torch.Tensor) -> torch.Tensor:
        """``t [T, ...]`` from time order to this direction's processing order, or back."""
        if self.order is not None:           # packed input: each sequence reversed within its length
            return packed.reverse_time(t, self.order)
        return t.flip(0) if self.reverse else t


class Packing:
    """What a ``PackedSequence`` input fixes for every layer: its template ``like``, the padded
    length ``T`` and, ``[T, B]``, the reverse direction's time index, the steps past each end."""

    def __init__(self, like: PackedSequence, lengths: torch.Tensor, T: int):
        self.like, self.T = like, T
        self.rev, self.gone = packed.reversal(lengths, T), packed.past_end(lengths, T)
        self.ends = lengths.to(torch.long) - 1


class Flow:
    """A layer's input or output: padded ``pad [T, B, *]`` (caller's batch order) and/or packed
    ``seq``; either form is made from the other only when a layer asks for it, so consecutive
    fused layers on packed input never pad (and the last one's packed output is PyTorch's own)."""

    def __init__(self, pad: torch.Tensor | None, seq: PackedSequence | None = None, packing: Packing | None = None):
        self.pad, self.seq, self.packing = pad, seq, packing

    def padded(self) -> torch.Tensor:
        if self.pad is None:
            self.pad = packed.padded(self.seq, self.packing.T)
        return self.pad

    def packed(self) -> PackedSequence:
        if self.seq is None:
            self.seq = packed.pack_like(self.pad, self.packing.like)
        return self.seq

    def dropped(self, p: float) -> "Flow":
        """Dropout between layers (training mode), on whichever form there is."""
        if self.pad is not None:
            return Flow(nn.functional.dropout(self.pad, p, True), None, self.packing)
        s = self.seq
        return Flow(None, PackedSequence(nn.functional.dropout(s.data, p, True), s.batch_sizes, s.sorted_indices,
                                         s.unsorted_indices), self.packing)


def time_major(m: nn.Module, input: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The module's input in ``[time, batch, features]``, and whether it came unbatched."""
    unbatched = input.dim() == 2
    return (input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if m.batch_first else input)), unbatched


def initial_state(m: nn.Module, x: torch.Tensor, hx, unbatched: bool):
    """``(h0 [L*D, B, P], c0 [L*D, B, H] or None)``: the caller's, or zeros."""
    cell = families.of(m).cell_state
    D, L, H = 2 if m.bidirectional else 1, m.num_layers, m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    if hx is None:
        return x.new_zeros(L * D, x.shape[1], P), (x.new_zeros(L * D, x.shape[1], H) if cell else None)
    h0, c0 = hx if cell else (hx, None)
    if unbatched:
        h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
    return h0, c0


def _final(family, h_ns: list, c_ns: list):
    h_n = torch.cat(h_ns, 0)
    return (h_n, torch.cat(c_ns, 0)) if family.cell_state else h_n


def user_layout(m: nn.Module, output: torch.Tensor, state, unbatched: bool):
    """The time-major output and final states back in the module's own return layout."""
    if unbatched:
        output = output.squeeze(1)
        state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
    elif m.batch_first:
        output = output.transpose(0, 1)
    return output, state


def fused_layer(m: nn.Module, layer: int, flow: Flow, h0, c0):
    """One whole layer through the fused kernel, packed where the input is. ``h0, c0 [D, B, *]``.
    Returns ``(Flow, h_n [D, B, P], c_n [D, B, H] or None)``."""
    if flow.packing is None:
        out, h_n, c_n = families.fused(m, flow.pad, h0, c0, layer_weights(m, layer), m.bias, m.bidirectional,
                                       m.training)
        return Flow(out), h_n, c_n
    seq, h_n, c_n = packed.run_layer(m, layer, flow.packed(), h0, c0)
    return Flow(None, seq, flow.packing), h_n, c_n


@dataclass
class Layer:
    """One layer of one call, as the engine hands it to a strategy: ``flow`` its input, ``h0, c0
    [D, B, *]`` its initial states, ``dirs`` one ``Direction`` record per direction."""
    module: nn.Module
    family: object
    layer: int
    flow: Flow
    h0: torch.Tensor
    c0: torch.Tensor | None
    dirs: list


class Recorder(Protocol):
    """What the engine asks of its recording strategy (the ``Probe``), in call order: ``begin`` a call,
    ``record_layer`` each layer (when no edit touches it), ``keep`` each layer's records, ``end`` the call."""
    grad: bool

    def begin(self, name: str, m: nn.Module, x: torch.Tensor, hx, unbatched: bool) -> tuple: ...

    def record_layer(self, run: Layer, differentiable: bool) -> tuple: ...

    def keep(self, call, name: str, layer: int, family, dirs: list) -> None: ...

    def end(self, name: str, family, h_ns: list, c_ns: list) -> None: ...


class Engine:
    """The forward of one module: ``recorder`` is ``(probe, name)`` or None; ``editors`` holds
    ``(intervention, {(layer, reverse, kind): (mask, value)})``, later ones winning on a shared key."""

    def __init__(self, module: nn.Module):
        # the module holds the engine (its forward is ours); the engine holds the module weakly, so
        # the two never form a reference cycle that outlives a dropped model until the next gc
        self._module, self.family = weakref.ref(module), families.of(module)
        self.recorder: tuple[Recorder, str] | None = None
        self.editors: list[tuple] = []

    @property
    def module(self) -> nn.Module:
        return self._module()

    def __getstate__(self) -> dict:
        # a model pickled while probed or edited (cloudpickle sends one to Dask workers) arrives as the
        # plain model: its copy's engine records and edits nothing (the Probe stays here), and holds the
        # module itself, since a weak reference cannot be pickled
        return {"_module": self.module}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_module"])

    def __repr__(self) -> str:
        return (f"Engine({self.family.name}: recorder {'on' if self.recorder else 'off'}, "
                f"{len(self.editors)} editor(s))")

    def forward(self, input, hx=None):
        m, family = self.module, self.family
        edits = {k: v for _, ed in self.editors for k, v in ed.items()}
        recorder, name = self.recorder or (None, None)
        packing = None
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input)
            packing, unbatched = Packing(input, lengths, x.shape[0]), False
        else:
            x, unbatched = time_major(m, input)
        if recorder is None:
            h0, c0 = initial_state(m, x, hx, unbatched)
        else:
            x, h0, c0, call = recorder.begin(name, m, x, hx, unbatched)
        differentiable = recorder is not None and recorder.grad and torch.is_grad_enabled()
        flow = Flow(x, input if packing is not None else None, packing)
        D, L = 2 if m.bidirectional else 1, m.num_layers
        h_ns, c_ns = [], []
        for layer in range(L):
            sl = slice(layer * D, (layer + 1) * D)
            h0_l, c0_l = h0[sl], (c0[sl] if c0 is not None else None)
            dirs = [Direction(m, layer, d == 1, h0_l[d].detach(), c0_l[d].detach() if c0_l is not None else None,
                              packing) for d in range(D)]
            mine = {k: v for k, v in edits.items() if k[0] == layer}
            run = Layer(m, family, layer, flow, h0_l, c0_l, dirs)
            if mine:
                flow, h_n, c_n = edited_layer(run, mine, record=recorder is not None, grads=differentiable)
            elif recorder is not None:
                flow, h_n, c_n = recorder.record_layer(run, differentiable)
            else:
                flow, h_n, c_n = fused_layer(m, layer, flow, h0_l, c0_l)
            if recorder is not None:
                recorder.keep(call, name, layer, family, dirs)
            h_ns.append(h_n)
            c_ns.append(c_n)
            if layer < L - 1 and m.dropout and m.training:
                flow = flow.dropped(m.dropout)
        if recorder is not None:
            recorder.end(name, family, h_ns, c_ns)
        if packing is not None:
            return flow.packed(), _final(family, h_ns, c_ns)
        return user_layout(m, flow.padded(), _final(family, h_ns, c_ns), unbatched)


def _engine_of(m: nn.Module) -> Engine | None:
    owner = getattr(m.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, Engine) else None


def join(modules: dict[str, nn.Module], client, edits: dict | None = None) -> None:
    """Register ``client`` with the engine of each of ``modules`` (``name -> module``), installing
    the engine's forward where there is none: a Probe as the recorder (``edits`` None), an
    Intervention with ``edits[name]``. Refuses, touching nothing, a module whose forward someone
    else replaced, or (a Probe) one that another Probe records."""
    foreign = [n for n, m in modules.items() if "forward" in m.__dict__ and _engine_of(m) is None]
    if foreign:
        raise RnnscopeError(f"module {foreign[0] or '<model>'} already has an instance-level forward that is "
                            "not rnnscope's", "remove it (del module.forward) before probing or editing")
    if edits is None:
        busy = [n for n, m in modules.items() if _engine_of(m) is not None and _engine_of(m).recorder is not None]
        if busy:
            raise RnnscopeError(f"module {busy[0] or '<model>'} is already recorded by another Probe",
                                "exit the other Probe first, or read what it records")
    for name, m in modules.items():
        engine = _engine_of(m)
        if engine is None:
            engine = Engine(m)
            m.forward = engine.forward
        if edits is None:
            engine.recorder = (client, name)
        else:
            engine.editors.append((client, edits[name]))


def leave(modules: dict[str, nn.Module], client) -> None:
    """Undo ``join``; the last to leave a module removes its forward, leaving it as it was."""
    for m in modules.values():
        engine = _engine_of(m)
        if engine is None:
            continue
        if engine.recorder is not None and engine.recorder[0] is client:
            engine.recorder = None
        engine.editors = [e for e in engine.editors if e[0] is not client]
        if engine.recorder is None and not engine.editors:
            del m.__dict__["forward"]


def expand(mask, value, B: int, U: int, like: torch.Tensor):
    """An edit's ``mask`` (bool ``[U]`` or ``[B, U]``) and ``value`` (a number, ``[U]`` or ``[B, U]``),
    both as ``[B, U]`` on ``like``'s device and dtype."""
    mask = torch.as_tensor(mask, dtype=torch.bool, device=like.device)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if mask.shape[-1] != U or mask.dim() > 2 or (mask.dim() == 2 and mask.shape[0] not in (1, B)):
        raise RnnscopeError(f"an edit mask has shape {list(mask.shape)} for {U} units and batch {B}",
                            f"give a bool mask of shape [{U}] or [{B}, {U}]")
    return mask.expand(B, U), value.expand(B, U)


def edited_layer(run: Layer, mine: dict, record: bool, grads: bool):
    """One layer with edits ``mine`` (``{(layer, reverse, kind): (mask, value)}``), each direction
    step by step on the padded input (an edit at step t changes every later step). ``record``: fill
    each direction's ``st``; ``grads``: and its gradients on backward.
    Returns ``(Flow of out [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None)``."""
    m, family, layer, flow, h0, c0, dirs = run.module, run.family, run.layer, run.flow, run.h0, run.c0, run.dirs
    x = flow.padded()
    B, H = x.shape[1], m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    alive = None if flow.packing is None else ~flow.packing.gone
    outs, h_ns, c_ns = [], [], []
    for d, rec in enumerate(dirs):
        ed = {k[2]: expand(*v, B, P if k[2] == "h" else H, x) for k, v in mine.items() if k[1] == rec.reverse}
        out, h_n, c_n = _edited_direction(m, family, direction_params(m, layer, rec.reverse), rec.along(x), h0[d],
                                          c0[d] if c0 is not None else None, ed, alive, rec if record else None, grads)
        outs.append(rec.along(out))
        h_ns.append(h_n)
        c_ns.append(c_n)
    return (Flow(torch.cat(outs, -1), None, flow.packing), torch.stack(h_ns),
            torch.stack(c_ns) if family.cell_state else None)


def _edited_direction(m, family, p, x, h, c, edits, alive, rec, grads):
    """One direction, step by step: ``x [T, B, in]`` in processing order; ``alive [T, B]`` (packed
    input): where a sequence has ended its state is carried unchanged, so its final state is its
    own. ``rec``: receives every state and gate after its edit (and, with ``grads``, ``dL/dh_t``
    and ``dL/dc_t``: the gradients of zero perturbations added right after each edit, as the
    reference does). Returns ``(out [T, B, P], h_T, c_T or None)``."""
    T = x.shape[0]
    pre = nn.functional.linear(x, p.w_ih, p.b_ih)                 # the input side for every step at once
    nudge, kept = {}, None
    if rec is not None:
        kept = {k: [] for k in family.kinds}
        if grads:
            for kind, like in (("h", h), ("c", c)):
                if f"grad_{kind}" in family.grad_kinds:
                    nudge[kind] = like.new_zeros(T, *like.shape, requires_grad=True)
                    nudge[kind].register_hook(lambda g, k=f"grad_{kind}": rec.add_grads({k: g}))

    def put(kind, v):
        if kind in edits:
            mask, value = edits[kind]
            v = torch.where(mask, value, v)
        if kind in nudge:
            v = v + nudge[kind][t]
        if kept is not None:
            kept[kind].append(v)
        return v

    outs = []
    for t in range(T):
        h_prev, c_prev = h, c
        h, c = family.cell(m, p, pre[t], h, c, put)
        h = put("h", h)
        if alive is not None:
            keep = alive[t].unsqueeze(-1)
            h = torch.where(keep, h, h_prev)
            c = torch.where(keep, c, c_prev) if c is not None else None
        outs.append(h)
    out = torch.stack(outs)
    if rec is not None:
        rec.st = {k: (out if k == "h" else torch.stack(v)).detach() for k, v in kept.items()}
    return out, h, c
