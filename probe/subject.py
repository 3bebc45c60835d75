"""What rnnscope probes: a model plus how to turn text into its steps.

``rnnscope.load(SPEC)`` returns one; ``record`` and the command line take one. A zoo ``Checkpoint``
is one too (its vocabulary is a one-id-per-character encoder). A user's own spec function
(``rnnscope probe --model file.py:fn``) returns a ``Subject`` or a tuple ``(model, encode[, loss])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class CharVocabulary(Protocol):
    """What the probe needs of a zoo vocabulary: its characters, one id each (the zoo sits below the
    probe and is never imported by it; a ``rnnscope.zoo.Vocab`` is one of these)."""
    chars: str

    def encode(self, text: str, unk: str | None = None): ...

    def decode(self, ids) -> str: ...


@runtime_checkable
class CharCheckpoint(Protocol):
    """A zoo ``Checkpoint`` as the probe sees it: a model, its ``CharVocabulary``, a card and a name."""
    model: Any
    vocab: CharVocabulary
    card: dict
    name: str


@dataclass
class Subject:
    """Args:
        model: an ``nn.Module`` (or TorchScript module) holding ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` modules.
        encoder: how text becomes steps: anything ``probe.encoders.as_encoder`` accepts (an object with
            ``encode(text) -> (ids [1, T], spans [T, 2])``, a ``str -> ids`` callable for char models, or a
            tokenizer callable returning offsets as Hugging Face tokenizers do).
        loss: ``"auto"`` (next-token cross-entropy when the output is ``[1, T, V]`` logits), ``None`` (no
            loss: states only), or ``fn(output, ids [T]) -> [T]`` per step, or a scalar (one per document).
        call: ``fn(model, ids [1, T]) -> output`` when the model is not called as ``model(ids)``.
            ``call`` and ``loss`` that take a ``document`` keyword are given the document the steps
            belong to: a dict of its ``name``, ``text`` and other fields (a ``.jsonl`` line's label).
        name, source, card: what it is and where it came from (``source`` is the SPEC).
        modules: the qualified names of the recurrent modules to record (``None``: every one).
    """
    model: Any
    encoder: Any = None
    loss: Any = "auto"
    call: Callable | None = None
    name: str = ""
    source: str = ""
    card: dict = field(default_factory=dict)
    modules: list[str] | None = None


def takes_document(fn) -> bool:
    """Whether the user's ``fn`` has a parameter named ``document`` (not merely ``**kwargs``: a call that
    passes its keywords on to the model would hand it one it does not take)."""
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):         # a builtin or C callable without a signature: called as before
        return False
    return any(p.name == "document" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


def subject_of(x) -> Subject:
    """A ``Subject`` from a zoo ``Checkpoint`` (its vocabulary encodes the text), a ``Subject``, a tuple
    ``(model, encode[, loss])``, or a bare model (its encoder then comes from ``record(encode=...)``)."""
    from torch import nn

    from rnnscope.errors import RnnscopeError
    if isinstance(x, Subject):
        return x
    if isinstance(x, CharCheckpoint) and isinstance(x.vocab, CharVocabulary):
        return Subject(x.model, x.vocab, name=x.name, source=f"zoo:{x.name}", card=x.card)
    if isinstance(x, tuple) and len(x) in (2, 3) and isinstance(x[0], nn.Module):
        return Subject(x[0], x[1], *x[2:])
    if isinstance(x, nn.Module):
        return Subject(x)
    raise RnnscopeError(f"a {type(x).__name__} is not something rnnscope can probe",
                        "give a model (nn.Module), a Subject, (model, encode[, loss]), or rnnscope.load(SPEC)")
