"""Checkpoints: a directory holding ``weights.safetensors`` and ``card.json``.

The card says what the weights are (architecture, vocabulary, corpus and its checksum, how the
model was trained, its validation and test loss) and holds the SHA-256 of the weights, so a
corrupt or truncated file is caught before it is used. Nothing is ever unpickled: weights are
safetensors, and a plain PyTorch state_dict is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rnnscope.errors import RnnscopeError
from .model import Architecture, CharModel
from .vocab import Vocab

FORMAT = "rnnscope-checkpoint"
FORMAT_VERSION = 1
CARD, WEIGHTS = "card.json", "weights.safetensors"
SHIPPED = Path(__file__).parent / "checkpoints"


@dataclass
class Checkpoint:
    """What ``load`` returns: the model (``eval()`` mode), the vocabulary that encodes its text, its
    card (architecture, corpus, training, losses) and its name."""
    model: CharModel
    vocab: Vocab
    card: dict = field(default_factory=dict)
    name: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a kill never leaves half a file where a good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: CharModel, vocab: Vocab, card: dict, out: Path) -> Path:
    """Write ``out/weights.safetensors`` then ``out/card.json`` (the card last: it vouches for the weights)."""
    out = Path(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(tensors, str(p)))
    card = dict(card, format=FORMAT, format_version=FORMAT_VERSION,
                architecture=model.architecture.to_dict(), vocab=vocab.chars,
                params=sum(t.numel() for t in tensors.values()),
                weights_sha256=sha256_file(out / WEIGHTS))
    atomic_write(out / CARD, lambda p: p.write_text(json.dumps(card, indent=1)))
    return out


def shipped() -> dict[str, Path]:
    """Name -> directory of every checkpoint shipped in ``zoo/checkpoints``."""
    return {p.name: p for p in sorted(SHIPPED.iterdir()) if (p / CARD).exists()} if SHIPPED.exists() else {}


def _resolve(spec: str | os.PathLike) -> tuple[Path, str]:
    spec = str(spec)
    if spec.startswith("zoo:"):
        name = spec[4:]
        known = shipped()
        if name not in known:
            raise RnnscopeError(f"unknown zoo checkpoint {name!r}",
                                f"use one of {', '.join(known) or '(none shipped)'} (see `rnnscope zoo list`)")
        return known[name], spec
    path = Path(spec)
    if not path.exists():
        raise RnnscopeError(f"checkpoint {spec} does not exist", "give a checkpoint directory, a file, or zoo:NAME")
    return path, spec


def _read_card(path: Path) -> dict:
    try:
        card = json.loads((path / CARD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RnnscopeError(f"{path / CARD} is corrupt ({type(err).__name__})",
                            "restore the checkpoint from its source or retrain it") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise RnnscopeError(f"{path / CARD} is not an rnnscope checkpoint card", "point at a checkpoint directory")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise RnnscopeError(f"{path} has checkpoint format {card['format_version']}, newer than this rnnscope "
                            f"reads ({FORMAT_VERSION})", "upgrade rnnscope")
    return card


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)   # never unpickle code
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise RnnscopeError(f"{path} is corrupt or truncated ({str(err).splitlines()[0][:120]})",
                            "restore the file from its source or retrain it") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RnnscopeError(f"{path} does not hold a state_dict of tensors", "save it with torch.save(model.state_dict())")
    return state


def _build(arch: Architecture, state: dict[str, torch.Tensor], source: str) -> CharModel:
    model = CharModel(arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        wrong = [k for k in expected if k in got and expected[k] != got[k]]   # model order: first layer first
        detail = (f"missing {missing[:3]}" if missing else
                  f"{wrong[0]} is {list(got[wrong[0]])}, expected {list(expected[wrong[0]])}" if wrong else
                  f"unexpected {sorted(set(got) - set(expected))[:3]}")
        raise RnnscopeError(f"{source} does not match architecture {arch.arch} "
                            f"{arch.layers}x{arch.hidden} (embed {arch.embed}, vocab {arch.vocab_size}): {detail}",
                            "give the architecture the weights were trained with")
    model.load_state_dict(state)
    return model.eval()


def load(spec: str | os.PathLike, *, arch: str | None = None, vocab: str | None = None,
         embed: int | None = None, hidden: int | None = None, layers: int | None = None) -> Checkpoint:
    """Load ``zoo:NAME``, a checkpoint directory, or a bare weights file (``.safetensors`` or a
    PyTorch state_dict) with its architecture given as keyword arguments."""
    path, source = _resolve(spec)
    if path.is_dir():
        card = _read_card(path)
        weights = path / WEIGHTS
        if not weights.exists():
            raise RnnscopeError(f"{weights} is missing", "restore the checkpoint from its source or retrain it")
        if card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
            raise RnnscopeError(f"{weights} is corrupt or truncated: its SHA-256 does not match the card",
                                "restore the checkpoint from its source or retrain it")
        try:
            a = Architecture(**card["architecture"])
            v = Vocab(card["vocab"])
        except (KeyError, TypeError) as err:
            raise RnnscopeError(f"{path / CARD} lacks a valid architecture or vocab ({err})",
                                "restore the checkpoint from its source") from None
        name = source[4:] if source.startswith("zoo:") else card.get("name", path.name)
        return Checkpoint(_build(a, _read_weights(weights), source), v, card, name)
    if None in (arch, vocab, hidden, layers):
        raise RnnscopeError(f"{path} is a bare weights file with no card",
                            "give its architecture: arch=, vocab=, hidden=, layers= (and embed=)")
    v = Vocab(vocab)
    a = Architecture(arch, len(v), embed or hidden, hidden, layers)
    return Checkpoint(_build(a, _read_weights(path), source), v, {"name": path.stem}, path.stem)
