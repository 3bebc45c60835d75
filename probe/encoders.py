"""Encoders: how text becomes a model's steps, each with its character span.

``as_encoder(obj)`` accepts what users already have and returns an ``Encoder`` whose
``encode(text) -> (ids LongTensor [T], spans int64 [T, 2])`` is checked before anything uses it:

- an object with ``encode(text)`` returning ids, or ``(ids, spans)``;
- a callable ``str -> ids`` (one id per character: a char model) or ``str -> (ids, spans)``;
- a Hugging Face-style tokenizer: called with ``return_offsets_mapping=True``, it returns a mapping
  with ``input_ids`` and ``offset_mapping`` (special tokens' empty offsets become (-1, -1));
- a zoo ``Vocab`` (one id per character).

A span is ``[start, end)`` in the text, or (-1, -1) for a step with no text (BOS, EOS, padding).
Text steps' starts and ends never go back; equal spans are allowed (a byte-level model gives
several steps one character).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from rnnscope.errors import RnnscopeError, call_user

FIX = "encode must return ids [T] (one per character) or (ids [T], spans [T, 2]) with spans in order"


@dataclass
class Encoder:
    """``encode(text) -> (ids [T], spans [T, 2])``, checked. ``kind``: "char" while every text encoded
    so far gave one id per character with span [i, i + 1], else "spans"; ``name``; ``decode(ids) -> str``
    or None."""
    fn: Callable[[str], Any]
    kind: str = "char"
    name: str | None = None
    decode: Callable | None = None

    def encode(self, text: str) -> tuple[torch.Tensor, np.ndarray]:
        got = call_user(self.fn, text, doing=f"the encoder failed on a text of {len(text):,} characters",
                        fix="fix the encoder, or the document")
        ids, spans = _split(got)
        ids = _ids(ids)
        if spans is None:
            if len(ids) != len(text):
                raise RnnscopeError(f"the encoder gave {len(ids)} ids for {len(text)} characters and no spans",
                                    "a str -> ids encoder must give one id per character; return (ids, spans) "
                                    "for words, subwords or BOS/EOS steps")
            return ids, char_spans(len(text))
        spans = check_spans(spans, len(ids), len(text))
        if (spans[:, 0] < 0).all():
            raise RnnscopeError(f"the encoder gave {len(ids)} steps for a text of {len(text):,} characters, none "
                                "with a span in it (all (-1, -1))", "give each step that reads text its span")
        if not np.array_equal(spans, char_spans(len(text))):
            self.kind = "spans"
        return ids, spans


def char_spans(n: int, start: int = 0) -> np.ndarray:
    """``[n, 2]`` spans of one step per character: ``[i, i + 1]``."""
    i = np.arange(start, start + n, dtype=np.int64)
    return np.stack([i, i + 1], 1)


def _split(got):
    """``ids`` or ``(ids, spans)``: a pair whose second part is ``[T, 2]`` is ids and spans."""
    if isinstance(got, (tuple, list)) and len(got) == 2 and not isinstance(got[0], (int, np.integer)):
        second = np.asarray(got[1]) if not isinstance(got[1], torch.Tensor) else got[1].numpy()
        if second.ndim == 2 and second.shape[-1] == 2:
            return got[0], second
    return got, None


def _ids(ids) -> torch.Tensor:
    """ids as a 1-D LongTensor; ``[1, T]`` is taken as ``[T]``."""
    try:
        a = ids if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if isinstance(a, np.ndarray) and a.dtype.kind == "u" and a.size:    # torch compares no uint64
            if int(a.max()) > np.iinfo(np.int64).max:
                raise RnnscopeError(f"the encoder returned the id {int(a.max()):,}, beyond any vocabulary", FIX)
            a = a.astype(np.int64)
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    except (TypeError, ValueError, RuntimeError):
        raise RnnscopeError(f"the encoder returned {type(ids).__name__}, not ids", FIX) from None
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.numel() == 0:
        raise RnnscopeError("the encoder returned no steps for a document", "give documents the encoder can encode")
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RnnscopeError(f"the encoder returned ids of {t.dtype} {list(t.shape)}, not whole numbers [T]", FIX)
    if (t < 0).any():
        raise RnnscopeError(f"the encoder returned the negative id {int(t.min())}", FIX)
    return t.long()


def check_spans(spans, steps: int, chars: int) -> np.ndarray:
    """``spans`` as int64 ``[steps, 2]``, refused in one line unless each is (-1, -1) or inside
    ``[0, chars]`` with start < end, and text steps' starts and ends never go back."""
    a = np.asarray(spans)
    if a.ndim != 2 or a.shape[1:] != (2,) or not (np.issubdtype(a.dtype, np.integer) or len(a) == 0):
        raise RnnscopeError(f"the encoder returned spans of shape {list(a.shape)} ({a.dtype}), not [T, 2] integers",
                            FIX)
    if len(a) != steps:
        raise RnnscopeError(f"the encoder returned {steps} ids but {len(a)} spans", "give one span per id")
    a = a.astype(np.int64)
    start, end = a[:, 0], a[:, 1]
    none = (start == -1) & (end == -1)
    for problem, rows in ((f"outside the text's {chars} characters", ~none & ((start < 0) | (end > chars))),
                          ("not start < end (use (-1, -1) for a step without text)", ~none & (start >= end))):
        if rows.any():
            i = int(np.argmax(rows))
            raise RnnscopeError(f"the encoder's span ({start[i]}, {end[i]}) at step {i} is {problem}", FIX)
    t = np.flatnonzero(~none)
    back = (start[t[1:]] < start[t[:-1]]) | (end[t[1:]] < end[t[:-1]])
    if back.any():
        i = int(t[1:][np.argmax(back)])
        raise RnnscopeError(f"the encoder's span ({start[i]}, {end[i]}) at step {i} goes back before the previous "
                            "step's: spans must be in text order", FIX)
    return a


def _hugging_face(tok) -> Callable:
    def encode(text):
        out = tok(text, return_offsets_mapping=True)
        try:
            ids, offsets = out["input_ids"], out["offset_mapping"]
        except (KeyError, TypeError, IndexError):
            raise RnnscopeError("the tokenizer's output has no input_ids and offset_mapping",
                                "use a fast tokenizer (it returns offsets), or wrap it in encode(text) -> "
                                "(ids, spans)") from None
        offsets = np.asarray(offsets.numpy() if isinstance(offsets, torch.Tensor) else offsets, np.int64)
        if offsets.ndim == 3 and offsets.shape[0] == 1:         # return_tensors="pt": a batch of one
            offsets = offsets[0]
        if offsets.ndim == 2 and offsets.shape[1:] == (2,):
            offsets = offsets.copy()
            offsets[offsets[:, 0] == offsets[:, 1]] = -1        # special tokens cover no text
        return ids, offsets
    return encode


def _takes_offsets(obj) -> bool:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return "return_offsets_mapping" in params


def as_encoder(obj, unk: str | None = None) -> Encoder:
    """An ``Encoder`` from anything the protocol accepts (see the module's docstring); ``unk`` is the
    stand-in character for a zoo ``Vocab``."""
    if isinstance(obj, Encoder):
        return obj
    from .subject import CharVocabulary
    if isinstance(obj, CharVocabulary):
        return Encoder(lambda text: obj.encode(text, unk=unk), "char", "vocab", obj.decode)
    decode = getattr(obj, "decode", None)
    decode = decode if callable(decode) else None
    name = getattr(obj, "name_or_path", None) or getattr(obj, "__name__", None) or type(obj).__name__
    name = name if isinstance(name, str) else None
    if callable(obj) and _takes_offsets(obj):
        return Encoder(_hugging_face(obj), name=name, decode=decode)
    if callable(getattr(obj, "encode", None)):
        return Encoder(obj.encode, name=name, decode=decode)
    if callable(obj):
        return Encoder(obj, name=name, decode=decode)
    raise RnnscopeError(f"{type(obj).__name__} is not an encoder",
                        "give encode(text) -> (ids, spans), a str -> ids function, or a tokenizer with offsets")
