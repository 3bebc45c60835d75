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

import numpy as np
import torch
from torch import nn

from rnnscope.errors import RnnscopeError, call_user
from rnnscope.store.attention import TOLERANCE, AttentionWriter, write_source   # one tolerance: probe and Run

from .cells import _rows, _stack


def named(model: nn.Module, attention) -> dict[str, Callable | None]:
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
        self.picks = named(model, attention or {})
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

    def calls(self, name: str) -> list[torch.Tensor]:
        """Every call's weights ``[batch, source]`` in call order, whichever sequence it began."""
        return [w for seq in self._seqs[name] for w in seq]

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


def chunk_rows(attention: Attention, steps: int, where: str) -> dict[str, list[torch.Tensor]]:
    """Each module's rows ``[source]`` over one pass of ``steps`` steps of a one-sequence batch: one
    call per step, refused in one line otherwise (``record`` stores a row per step)."""
    rows = {}
    for name in attention:
        got = attention.calls(name)
        if len(got) != steps or any(w.shape[0] != 1 for w in got):
            batch = {int(w.shape[0]) for w in got} or {1}
            raise RnnscopeError(f"attention module {name} was called {len(got)} time(s) (batch {max(batch)}) over "
                                f"{steps} steps of the encoder {where}",
                                "make the model call it once per id of its input [1, T], or record without it")
        rows[name] = [w[0].float() for w in got]
    return rows


def sources_of(docs, encoder) -> tuple[list[str], list] | None:
    """Each document's ``source`` text and its positions' spans ``[positions, 2]`` (the Run's encoder
    applied to it), when the documents carry one (an encoder-decoder corpus); None when none does."""
    have = [isinstance(f.get("source"), str) for f in docs.fields] if docs.fields else [False]
    if not any(have):
        return None
    if not all(have) or not all(f["source"] for f in docs.fields):
        i = have.index(False) if not all(have) else next(i for i, f in enumerate(docs.fields) if not f["source"])
        raise RnnscopeError(f"document {docs.names[i]!r} has no source text, while others have one",
                            'give every document a non-empty "source" string, or none')
    texts = [f["source"] for f in docs.fields]
    spans = []
    for name, text in zip(docs.names, texts):
        try:
            spans.append(np.asarray(encoder.encode(text)[1], np.int64))
        except RnnscopeError as err:
            raise RnnscopeError(f"the source of document {name!r}: {err.problem}", err.fix) from None
    return texts, spans


def check_source(rows: dict[str, list[torch.Tensor]], positions: int | None, name: str) -> str:
    """What the rows are over: "source" (their length is the document's encoded source, ``positions``)
    or "positions" (no source text: indexes); a mismatch is one line."""
    if positions is None:
        return "positions"
    for module, got in rows.items():
        bad = next((len(w) for w in got if len(w) != positions), None)
        if bad is not None:
            raise RnnscopeError(f"attention module {module} weighs {bad} source positions in document {name!r}, "
                                f"whose source the encoder makes {positions} steps",
                                "encode the source with the Run's encoder in the model's call, or leave out the "
                                "documents' source field (the positions are then indexes)")
    return "source"


class StoredAttention:
    """``record``'s attention modules: each pass's rows appended to ``attention/{name}/`` in the Run
    being written (``writer``, a ``RunWriter``), each document's checked against its ``sources`` (``sources_of``)."""

    def __init__(self, writer, picks: dict, names: list[str], sources):
        self.picks, self.names, self.sources, self.run_dir = picks, names, sources, writer.tmp
        self.writers = {n: AttentionWriter(writer.tmp, n) for n in picks}
        writer.rows.extend(w.weights for w in self.writers.values())     # closed with the Run's, whatever happens
        self.over = "positions" if sources is None else "source"

    def add(self, attention: Attention, steps: int, d: int, where: str) -> None:
        rows = chunk_rows(attention, steps, where)
        check_source(rows, None if self.sources is None else len(self.sources[1][d]), self.names[d])
        for name, got in rows.items():
            self.writers[name].add([w.numpy() for w in got])

    def manifest(self) -> dict:
        """The manifest's ``attention`` and ``source`` (the files closed and written)."""
        entry = {"attention": {n: w.finish(self.over) for n, w in self.writers.items()}}
        if self.sources is not None:
            entry["source"] = write_source(self.run_dir, *self.sources)
        return entry
