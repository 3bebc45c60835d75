"""The trainer's settings: one dataclass, the single source of their defaults. ``rnnscope zoo train``
derives its flags from it (each field's ``help`` and lower bound are its metadata), so no default is
restated. Torch-free, so building the command line costs no torch import."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _f(default, help: str, low=None, choices=None, kind: str | None = None):
    return field(default=default, metadata={"help": help, "low": low, "choices": choices, "kind": kind})


CORPORA = ("linux", "shakespeare", "python")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = _f("lstm", "recurrent family", choices=("rnn", "lstm", "gru"))
    corpus: str = _f("linux", "corpus to learn", choices=CORPORA)
    layers: int = _f(2, "recurrent layers", 1)
    hidden: int = _f(256, "units per layer", 1)
    embed: int = _f(64, "embedding width", 1)
    dropout: float = _f(0.0, "dropout between layers", kind="probability")
    batch: int = _f(64, "parallel streams", 1)
    seq_len: int = _f(100, "truncated BPTT length", 1)
    steps: int = _f(3000, "optimizer steps", 1)
    optimizer: str = _f("adam", "optimizer", choices=("adam", "rmsprop", "sgd"))
    lr: float = _f(2e-3, "peak learning rate", kind="positive")
    min_lr: float = _f(1e-4, "final learning rate (cosine)", kind="positive")
    warmup: int = _f(100, "warmup steps", 0)
    clip: float = _f(5.0, "gradient-norm clip (0: none)", kind="nonnegative")
    val_every: int = _f(500, "validate every N steps", 1)
    checkpoint_every: int = _f(250, "save resumable state every N steps", 1)
    seed: int = _f(0, "random seed", 0)
    watch_every: int = _f(100, "watch gradient flow into OUT/watch every N steps (0: off)", 0)


def config_from(**kwargs) -> TrainConfig:
    """A ``TrainConfig`` from parsed flags (names not in it, and None values, are left out)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kwargs.items() if k in names and v is not None})
