"""What rnnscope probes: a model plus how to turn text into its steps.

``rnnscope.load(SPEC)`` returns one; ``record`` and the command line take one. A zoo ``Checkpoint``
is one too (its vocabulary is a one-id-per-character encoder). A user's own spec function
(``rnnscope probe --model file.py:fn``) returns a ``Subject`` or a tuple ``(model, encode[, loss])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Subject:
    """Args:
        model: an ``nn.Module`` (or TorchScript module) holding ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` modules.
        encoder: how text becomes steps: anything ``probe.encoders.as_encoder`` accepts (an object with
            ``encode(text) -> (ids [1, T], spans [T, 2])``, a ``str -> ids`` callable for char models, or a
            tokenizer callable returning offsets as Hugging Face tokenizers do).
        loss: ``"auto"`` (next-token cross-entropy when the output is ``[1, T, V]`` logits), ``None`` (no
            loss: states only), or ``fn(output, ids [T]) -> [T]`` per step, or a scalar.
        call: ``fn(model, ids [1, T]) -> output`` when the model is not called as ``model(ids)``.
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
