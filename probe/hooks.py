"""``Probe``: record every state, gate and gradient of every recurrent submodule of a model.

While the ``with`` block is open, each ``nn.RNN / nn.LSTM / nn.GRU`` runs its own fused kernel
one layer at a time, which returns the same outputs and exposes every layer's states: an LSTM on
oneDNN's gates and cells are read from the kernel's workspace (``probe.workspace``), the rest are
replayed from the layer's outputs (``probe.replay``). On exit each module's ``forward`` is
restored; nothing else is touched.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnscope.errors import RnnscopeError

from . import packed, workspace
from .autograd import RecordedDirection
from .keys import GRAD_KINDS, KINDS, family, recurrent_modules, state_key
from .replay import direction_params, initial_state, run_layer, states, time_major, user_layout


class _Direction:
    """One direction of one layer in one call: its recorded states and, after backward, their gradients."""

    def __init__(self, module, layer, reverse, h0, c0):
        self.module, self.layer, self.reverse = module, layer, reverse
        self.h0, self.c0 = h0, c0
        # packed input: per-sequence time reversal, steps past each end, each sequence's last step
        self.order: torch.Tensor | None = None
        self.gone: torch.Tensor | None = None
        self.ends: torch.Tensor | None = None
        self.st: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] | None = None

    def add_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """Called from backward; a second backward through the same graph accumulates, as ``.grad`` does."""
        if self._grads is None:
            self._grads = {k: v.detach() for k, v in grads.items()}
        else:
            self._grads = {k: self._grads[k] + v.detach() for k, v in grads.items()}

    def get(self, kind: str) -> torch.Tensor:
        if kind.startswith("grad_"):
            if self._grads is None:
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


class CallTrace(Mapping):
    """The states of one forward call of one recurrent module: ``trace[key] -> [batch, time, units]``."""

    def __init__(self):
        self._dirs: dict[str, tuple[_Direction, str]] = {}

    def _add(self, key: str, d: _Direction, kind: str) -> None:
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
                                "read each call from probe.calls[i]")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def __iter__(self):
        seen = {}
        for c in self._calls:
            seen.update(dict.fromkeys(c))
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Probe:
    """``with Probe(model, grad=True) as probe: ...`` records every recurrent submodule.

    ``kinds``: the state kinds to keep (default all; ``h`` always, as the others derive from it).
    ``carry``: a call made with no initial state starts from where the module's previous call in
    this block ended, so a long text can be fed in chunks and read as one sequence.
    ``param_grads=False`` (with ``grad=True``): parameters are frozen inside the block, so
    ``backward()`` computes state gradients only, faster, and leaves every ``.grad`` untouched.
    """

    def __init__(self, model: nn.Module, grad: bool = False, kinds=None, carry: bool = False,
                 param_grads: bool = True):
        self.model, self.grad, self.carry, self.param_grads = model, grad, carry, param_grads
        self.kinds = None if kinds is None else set(kinds) | {"h"}
        self.modules = recurrent_modules(model)
        if not self.modules:
            raise RnnscopeError(f"{type(model).__name__} has no nn.RNN, nn.LSTM or nn.GRU submodule to probe",
                                "probe a model built from PyTorch's recurrent modules")
        self.calls: list[CallTrace] = []
        self._last_state: dict[str, object] = {}
        self._saved: dict[nn.Parameter, bool] = {}

    @property
    def trace(self) -> Trace:
        return Trace(self.calls)

    def __enter__(self) -> "Probe":
        taken = [name for name, m in self.modules.items() if "forward" in m.__dict__]
        if taken:       # checked before touching anything, so a refusal leaves the model as it was
            raise RnnscopeError(f"module {taken[0] or '<model>'} already has an instance-level forward "
                                "(another probe?)", "exit the other Probe first")
        for name, m in self.modules.items():
            m.forward = partial(self._forward, name, m)
        if not self.param_grads:
            self._saved = {p: p.requires_grad for p in self.model.parameters()}
            for p in self._saved:
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules.values():
            m.__dict__.pop("forward", None)
        for p, flag in self._saved.items():
            p.requires_grad_(flag)
        self._saved = {}

    def carry_from(self, step: int) -> None:
        """With ``carry``: the next call of each module starts from the state after ``step`` (an index
        into its latest call) instead of its end: ``record`` reads ahead past a chunk for gradients."""
        for name, m in self.modules.items():
            call = next((c for c in reversed(self.calls) if any(k.startswith(f"{name}.l" if name else "l")
                                                                   for k in c)), None)
            if call is None:
                continue
            D = 2 if m.bidirectional else 1
            recs = [call._dirs[state_key(name, layer, d == 1, "h")][0] for layer in range(m.num_layers)
                    for d in range(D)]
            h = torch.stack([r.st["h"][step] for r in recs])
            self._last_state[name] = (h, torch.stack([r.st["c"][step] for r in recs])) \
                if family(m) == "LSTM" else h

    def _start(self, name: str, m: nn.Module, x: torch.Tensor, hx, unbatched: bool):
        """``(h0, c0 or None)``, ``[L*D, B, *]``: the caller's, carried from the previous call, or zeros."""
        if hx is None and self.carry and name in self._last_state:
            hx = self._last_state[name]
            prev_b = (hx[0] if isinstance(hx, tuple) else hx).shape[1]
            if prev_b != x.shape[1]:
                raise RnnscopeError(f"{name}: carried state has batch {prev_b}, this call has batch {x.shape[1]}",
                                    "keep the batch size fixed while carrying state, or pass hx")
            return hx if family(m) == "LSTM" else (hx, None)
        return initial_state(m, x, hx, unbatched)

    def _keep(self, call: CallTrace, name: str, layer: int, kind: str, recs) -> None:
        for rec in recs:
            for k in KINDS[kind]:
                if k in rec.st and (self.kinds is None or k in self.kinds):
                    call._add(state_key(name, layer, rec.reverse, k), rec, k)
            if self.grad:
                for k in GRAD_KINDS[kind]:
                    call._add(state_key(name, layer, rec.reverse, k), rec, k)

    def _end(self, name: str, kind: str, h_ns: list, c_ns: list) -> None:
        if self.carry:          # kept in the batched layout, whatever the caller's
            h_n = torch.cat(h_ns, 0).detach()
            self._last_state[name] = (h_n, torch.cat(c_ns, 0).detach()) if kind == "LSTM" else h_n

    def _forward(self, name: str, m: nn.Module, input, hx=None):
        if isinstance(input, PackedSequence):
            return self._packed_forward(name, m, input, hx)
        kind = family(m)
        x, unbatched = time_major(m, input)
        D, L = 2 if m.bidirectional else 1, m.num_layers
        P = getattr(m, "proj_size", 0) or m.hidden_size
        h0, c0 = self._start(name, m, x, hx, unbatched)
        call = CallTrace()
        self.calls.append(call)
        if self.grad and not self.param_grads and torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()     # a leaf, so gradients reach the states with frozen weights
        layer_in, h_ns, c_ns = x, [], []
        differentiable = self.grad and torch.is_grad_enabled()
        for layer in range(L):
            sl = slice(layer * D, (layer + 1) * D)
            recs = [_Direction(m, layer, d == 1, h0[sl][d].detach(), c0[sl][d].detach() if c0 is not None else None)
                    for d in range(D)]
            if differentiable:
                out, h_n, c_n = self._differentiable_layer(m, layer, layer_in, h0[sl], c0, sl, recs)
            else:
                out, h_n, c_n = self._plain_layer(m, layer, layer_in, h0[sl], c0, sl, recs, P,
                                                  only_h=self.kinds == {"h"})
            self._keep(call, name, layer, kind, recs)
            h_ns.append(h_n)
            c_ns.append(c_n)
            layer_in = out
            if layer < L - 1 and m.dropout and m.training:
                layer_in = nn.functional.dropout(out, m.dropout, True)
        self._end(name, kind, h_ns, c_ns)
        output, state = user_layout(m, layer_in, h_ns, c_ns, unbatched)
        return output, state

    def _packed_forward(self, name: str, m: nn.Module, seq: PackedSequence, hx):
        """Sequences of different lengths (``probe.packed``), padded: ``[batch, time, units]`` in the
        caller's batch order, NaN past each sequence's end. With grad mode off an LSTM on oneDNN
        runs padded and is read from its workspace; otherwise, without state gradients, each layer
        runs fused on the packed data and its states are replayed; with them each direction runs
        padded through ``RecordedDirection``. Either padded way, each sequence's final state is
        taken at its own end (``seq`` holds the layer input packed only while ``fresh``)."""
        kind = family(m)
        x_pad, lengths = pad_packed_sequence(seq)
        T, D, L = x_pad.shape[0], 2 if m.bidirectional else 1, m.num_layers
        P = getattr(m, "proj_size", 0) or m.hidden_size
        h0, c0 = self._start(name, m, x_pad, hx, False)
        rev, gone, ends = packed.reversal(lengths, T), packed.past_end(lengths, T), lengths.to(torch.long) - 1
        call = CallTrace()
        self.calls.append(call)
        differentiable = self.grad and torch.is_grad_enabled()
        if differentiable and not self.param_grads and not x_pad.requires_grad:
            x_pad = x_pad.detach().requires_grad_()
        h_ns, c_ns, fresh = [], [], True
        for layer in range(L):
            sl = slice(layer * D, (layer + 1) * D)
            recs = [_Direction(m, layer, d == 1, h0[sl][d].detach(), c0[sl][d].detach() if c0 is not None else None)
                    for d in range(D)]
            for rec in recs:
                rec.order, rec.gone, rec.ends = (rev if rec.reverse else None), gone, ends
            done = None
            if kind == "LSTM" and not torch.is_grad_enabled():
                # oneDNN does not take packed input; on the padded batch it is faster than PyTorch's
                # packed kernel, and its workspace holds every gate (no graph: c_n is read, not traced)
                done = _workspace_layer(m, layer, x_pad, h0[sl], c0[sl], recs)
            if done is not None:
                (out_pad, h_n, c_n), fresh = done, False
            elif differentiable:
                out_pad, h_n, c_n = self._differentiable_layer(m, layer, x_pad, h0[sl], c0, sl, recs)
                fresh = False
            else:
                seq = seq if fresh else packed.pack_like(x_pad, seq)
                out, h_n, c_n = packed.run_layer(m, layer, seq, h0[sl], c0[sl] if c0 is not None else None)
                out_pad = packed.padded(out, T)
                _replay(m, layer, x_pad, out_pad, recs, P, only_h=self.kinds == {"h"})
                seq, fresh = out, True
            self._keep(call, name, layer, kind, recs)
            h_ns.append(h_n)
            c_ns.append(c_n)
            x_pad = out_pad
            if layer < L - 1 and m.dropout and m.training:
                x_pad, fresh = nn.functional.dropout(out_pad, m.dropout, True), False
        self._end(name, kind, h_ns, c_ns)
        h_n = torch.cat(h_ns, 0)
        output = seq if fresh else packed.pack_like(x_pad, seq)     # fresh: the packed kernel's own
        return output, ((h_n, torch.cat(c_ns, 0)) if kind == "LSTM" else h_n)

    @staticmethod
    def _plain_layer(m, layer, x, h0, c0, sl, recs, P, only_h=False):
        """No state gradients wanted: the fused kernel on the whole layer (autograd as usual for the
        caller's own backward), then the states replayed without a graph. An LSTM on oneDNN reads
        them from the kernel's workspace instead (``probe.workspace``). ``only_h``: the layer's
        outputs are all that is kept, so the plain inference kernel gives them and nothing is replayed."""
        if isinstance(m, nn.LSTM) and not only_h:
            done = _workspace_layer(m, layer, x, h0, c0[sl], recs)
            if done is not None:
                return done
        out, h_n, c_n = run_layer(m, layer, x, (h0, c0[sl]) if c0 is not None else h0)
        _replay(m, layer, x, out, recs, P, only_h)
        return out, h_n, c_n

    @staticmethod
    def _differentiable_layer(m, layer, x, h0, c0, sl, recs):
        """Each direction through ``RecordedDirection``, whose backward is the adjoint recurrence."""
        outs, h_ns, c_ns = [], [], []
        for d, rec in enumerate(recs):
            p = direction_params(m, layer, rec.reverse)
            out, h_n, c_n = RecordedDirection.apply(rec, rec.along(x), h0[d], c0[sl][d] if c0 is not None else None,
                                                    p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr)
            outs.append(rec.along(out))
            h_ns.append(h_n)
            c_ns.append(c_n)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        return out, torch.stack(h_ns), (torch.stack(c_ns) if c0 is not None else None)


def _replay(m, layer, x, out, recs, P, only_h=False):
    """Each direction's states replayed without a graph from the layer's input ``x`` and outputs
    ``out [T, B, D*P]`` (time order; ``rec.along`` gives its processing order); only ``h`` with ``only_h``."""
    with torch.no_grad():
        for d, rec in enumerate(recs):
            xd, hd = rec.along(x.detach()), rec.along(out[..., d * P:(d + 1) * P].detach())
            rec.st = {"h": hd} if only_h else states(m, direction_params(m, layer, rec.reverse), xd, hd,
                                                      rec.h0, rec.c0)


def _workspace_layer(m, layer, x, h0, c0, recs):
    """``Probe._plain_layer`` for an LSTM layer whose gates and cells oneDNN's workspace holds:
    each direction through the fused kernel on its own (the reverse one on its reversed input, so
    its states come in processing order), or None when the workspace cannot be read. Padded packed
    input (``rec.ends`` set, no graph): each sequence's final state is at its own end."""
    outs, h_ns, c_ns, sts = [], [], [], []
    for d, rec in enumerate(recs):
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
    for rec, st in zip(recs, sts):
        rec.st = st
    return (outs[0] if len(outs) == 1 else torch.cat(outs, -1)), torch.stack(h_ns), torch.stack(c_ns)
