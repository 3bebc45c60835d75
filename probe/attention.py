"""Attention at every step: the weights a named module computes over the source, one step per call.

``Probe(model, attention={"decoder.attn": None})`` (or ``attention=["decoder.attn"]``) puts a
forward hook on that module for the block; each call of it is one step of the decoder, and its
weights ``[batch, source]`` are kept. ``probe.attention["decoder.attn"]`` is ``[batch, steps,
source]``: one row per sequence, the batch of the first step, NaN where a row had left a batch
that shrinks by dropping its last rows (captions sorted longest first), as a cell's states read.

Where the weights are in the module's output: a tensor ``[batch, source]`` is them; in a tuple or
list, the first ``[batch, source]`` tensor whose rows are weights; otherwise the user's picker
``fn(output) -> [batch, source]`` says (``{"attn": lambda out: out[1].squeeze(1)}`` for the
tutorial's ``BahdanauAttention``, which returns ``(context, weights [batch, 1, source])``). An
output that holds no weights (rows non-negative and summing to 1 within 1e-4) is refused in one line.

A batch that grows, or a source of another length, starts a new sequence (a new batch of captions):
``probe.attention.sequences(name)`` holds each; ``probe.attention[name]`` is the one there is.
The weights are detached copies: recording them changes nothing the model computes or its gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from rnnscope.errors import RnnscopeError, call_user

from .cells import _rows, _stack

TOLERANCE = 1e-4        # how far a row's sum may be from 1: softmax in float32 over a few thousand positions


def _named(model: nn.Module, attention) -> dict[str, Callable | None]:
    """``attention`` (a mapping name -> picker or None, or a list of names) as name -> picker, each
    name a module of ``model``; refused in one line otherwise."""
    if isinstance(attention, str):
        attention = [attention]
    pairs = attention.items() if isinstance(attention, Mapping) else [(n, None) for n in attention]
    named = dict(model.named_modules())
    chosen = {}
    for name, pick in pairs:
        if not isinstance(name, str) or name not in named:
            some = ", ".join(n for n in list(named)[1:9])
            raise RnnscopeError(f"attention module {name!r} is not a submodule of {type(model).__name__}",
                                f"name it by its qualified name (model.named_modules(): {some} ...)")
        if pick is not None and not callable(pick):
            raise RnnscopeError(f"the picker given for attention module {name!r} is a {type(pick).__name__}, "
                                "not a function", "give None or fn(output) -> weights [batch, source]")
        chosen[name] = pick
    return chosen


def _is_weights(w) -> bool:
    """``w [batch, source]`` (or ``[source]`` unbatched): finite, non-negative rows summing to 1."""
    if not isinstance(w, torch.Tensor) or w.dim() not in (1, 2) or not w.is_floating_point() or w.numel() == 0:
        return False
    w = _rows(w.detach()).double()
    return bool(torch.isfinite(w).all() and (w >= 0).all() and ((w.sum(1) - 1).abs() <= TOLERANCE).all())


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape [{', '.join(map(str, out.shape))}]"
    if isinstance(out, (tuple, list)):
        parts = (_describe(o) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out)
        return f"a {type(out).__name__} of {', '.join(parts)}"
    return f"a {type(out).__name__}"


def weights_of(name: str, output, pick: Callable | None) -> torch.Tensor:
    """The weights ``[batch, source]`` in one call's ``output`` (see the module docstring), or one line."""
    if pick is not None:
        w = call_user(pick, output, doing=f"the picker of attention module {name}",
                      fix="fix the function given for it in attention=")
        if not _is_weights(w):
            raise RnnscopeError(f"the picker of attention module {name} returned {_describe(w)}, not weights over "
                                f"the source (a [batch, source] tensor whose rows are non-negative and sum to 1)",
                                "return the attention weights, e.g. lambda out: out[1].squeeze(1)")
        return w
    found = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (tuple, list)) else []
    w = next((o for o in found if _is_weights(o)), None)
    if w is None:
        raise RnnscopeError(f"attention module {name} returned {_describe(output)}, which holds no weights over the "
                            "source (a [batch, source] tensor whose rows are non-negative and sum to 1)",
                            f"give a picker: attention={{{name!r}: lambda out: <the weights [batch, source]>}}")
    return w


class Attention(Mapping):
    """What a Probe records of its attention modules: ``attention[name] -> [batch, steps, source]``."""

    def __init__(self, model: nn.Module, attention=None):
        self.picks = _named(model, attention or {})
        self.modules = {n: model.get_submodule(n) for n in self.picks}
        self._seqs: dict[str, list[list[torch.Tensor]]] = {n: [] for n in self.picks}
        self._hooks: list = []

    def _step(self, name: str, module, args, output) -> None:
        w = _rows(weights_of(name, output, self.picks[name]).detach()).clone()
        seqs = self._seqs[name]
        last = seqs[-1][-1] if seqs and seqs[-1] else None
        if last is None or w.shape[0] > last.shape[0] or w.shape[1] != last.shape[1]:
            seqs.append([])
        seqs[-1].append(w)

    def join(self) -> None:
        """Hook every named module for the block (a forward hook: its own forward is left alone)."""
        for name, m in self.modules.items():
            self._hooks.append(m.register_forward_hook(lambda mod, a, out, name=name: self._step(name, mod, a, out)))

    def leave(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def clear(self) -> None:
        for seqs in self._seqs.values():
            seqs.clear()

    def sequences(self, name: str) -> list[torch.Tensor]:
        """Each sequence of ``name``'s steps, ``[batch, steps, source]``, in the order they began."""
        if name not in self._seqs:
            raise KeyError(f"{name!r} is not an attention module of this Probe; its are: {', '.join(self._seqs)}")
        return [_stack(s, s[0].shape[0]) for s in self._seqs[name]]

    def __getitem__(self, name: str) -> torch.Tensor:
        seqs = self.sequences(name)
        if len(seqs) != 1:
            raise RnnscopeError(f"attention module {name} recorded {len(seqs)} sequences",
                                "read each from probe.attention.sequences(name)[i]" if seqs else
                                "call the model inside the Probe block first")
        return seqs[0]

    def __contains__(self, name) -> bool:
        return name in self._seqs

    def __iter__(self):
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __repr__(self) -> str:
        return "Attention(" + ", ".join(f"{n}: {sum(len(s) for s in seqs)} step(s)" for n, seqs in self._seqs.items()) \
            + ")"
