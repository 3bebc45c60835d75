"""Char-level language models: ``nn.Embedding -> nn.RNN | nn.LSTM | nn.GRU -> nn.Linear``.

The recurrent module is the fused PyTorch one and is named ``rnn``, so probe state keys read
``rnn.l0.c``: this is what users train, and what ``probe`` must handle.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rnnscope.errors import RnnscopeError

ARCHS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
GATES_PER_ARCH = {"rnn": 1, "lstm": 4, "gru": 3}
# Bounds on a card's sizes, far above any char model (the zoo's are 2 x 512) but low enough that a
# careless or hostile card cannot ask for tens of GB before its weights are even looked at: an LSTM
# layer of 16384 units holds 2.1e9 weights (8.6 GB in float32), so the count is capped there too.
LIMITS = {"vocab_size": 1 << 20, "embed": 16384, "hidden": 16384, "layers": 64}
MAX_PARAMS = 1 << 31


@dataclass(frozen=True)
class Architecture:
    arch: str          # rnn | lstm | gru
    vocab_size: int
    embed: int
    hidden: int
    layers: int
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise RnnscopeError(f"unknown architecture {str(self.arch)[:40]!r}", f"use one of {', '.join(ARCHS)}")
        fix = "give the architecture the weights were trained with"
        for name, top in LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):       # "256", 256.7 and True are not sizes
                raise RnnscopeError(f"architecture field {name} must be a whole number, got {str(v)[:40]!r}", fix)
            if not 1 <= v <= top:
                raise RnnscopeError(f"architecture field {name} must be >= 1 and <= {top}, got {v}", fix)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise RnnscopeError(f"architecture field dropout must be a number in [0, 1), got {str(d)[:40]!r}", fix)
        if parameter_count(self) > MAX_PARAMS:
            raise RnnscopeError(f"architecture {self.arch} {self.layers}x{self.hidden} (embed {self.embed}, vocab "
                                f"{self.vocab_size}) has {parameter_count(self):,} parameters, more than {MAX_PARAMS:,}",
                                fix)

    def to_dict(self) -> dict:
        return asdict(self)


class CharModel(nn.Module):
    """``model(ids[batch, time]) -> logits[batch, time, vocab]``; ``state`` is carried across calls."""

    def __init__(self, a: Architecture):
        super().__init__()
        self.architecture = a
        self.embed = nn.Embedding(a.vocab_size, a.embed)
        self.rnn = ARCHS[a.arch](a.embed, a.hidden, num_layers=a.layers, batch_first=True,
                                 dropout=a.dropout if a.layers > 1 else 0.0)
        self.head = nn.Linear(a.hidden, a.vocab_size)

    def forward(self, ids: torch.Tensor, state=None, return_state: bool = False):
        out, state = self.rnn(self.embed(ids), state)
        logits = self.head(out)
        return (logits, state) if return_state else logits


def parameter_count(a: Architecture) -> int:
    """Exact parameter count of ``CharModel(a)`` without building it."""
    g, h, e, v = GATES_PER_ARCH[a.arch], a.hidden, a.embed, a.vocab_size
    rec = sum(g * (h * (e if layer == 0 else h) + h * h + 2 * h) for layer in range(a.layers))
    return v * e + rec + h * v + v


def matched_hidden(arch: str, target: int, vocab_size: int, embed: int, layers: int) -> int:
    """The hidden width that gives ``arch`` the parameter count closest to ``target``.

    Karpathy et al. compare RNN, LSTM and GRU at equal parameter counts; this finds the width.
    """
    best = min(range(8, 4097), key=lambda h: abs(parameter_count(
        Architecture(arch, vocab_size, embed, h, layers)) - target))
    return best


def bits(nats: float) -> float:
    return nats / math.log(2)
