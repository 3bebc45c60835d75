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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rnnscope.errors import RnnscopeError, first_line
from rnnscope.store import atomic_write, regular_file
from rnnscope.store.files import inside, read_bytes

from .model import Architecture, CharModel
from .vocab import Vocab

FORMAT = "rnnscope-checkpoint"
FORMAT_VERSION = 1
CARD, WEIGHTS = "card.json", "weights.safetensors"
SHIPPED = Path(__file__).parent / "checkpoints"
CARD_LIMIT = 16 << 20       # a card is names, sizes and a vocabulary: kilobytes
RESTORE = "restore the checkpoint from its source or retrain it"
# a safetensors header is names, dtypes, shapes and offsets: a CharModel's is under 2 KB, a model of a
# thousand tensors about 100 KB; a larger header (a 90 MB __metadata__) is refused before it is parsed
HEADER_LIMIT = 16 << 20


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
    if not path.is_dir():       # a FIFO or a device would block or never end: only regular files are read
        regular_file(path, "checkpoint", "give a checkpoint directory, a weights file, or zoo:NAME")
    return path, spec


def _own(path: Path, name: str) -> Path:
    """``path/name``, refused when a link takes it out of the checkpoint's folder."""
    return inside(path, name, what="the checkpoint's folder", fix=RESTORE)


def _read_card(path: Path) -> dict:
    data = read_bytes(_own(path, CARD), "the checkpoint card", RESTORE, CARD_LIMIT)
    try:
        card = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RnnscopeError(f"{path / CARD} is corrupt ({type(err).__name__})",
                            "restore the checkpoint from its source or retrain it") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise RnnscopeError(f"{path / CARD} is not an rnnscope checkpoint card", "point at a checkpoint directory")
    version = card.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RnnscopeError(f"{path / CARD} has no valid format_version", RESTORE)
    if version > FORMAT_VERSION:
        raise RnnscopeError(f"{path} has checkpoint format {card['format_version']}, newer than this rnnscope "
                            f"reads ({FORMAT_VERSION})", "upgrade rnnscope")
    return card


def _shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of ``CharModel(arch)``, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in CharModel(arch).state_dict().items()}


def _check_shapes(arch: Architecture, got: dict[str, tuple[int, ...]], source: str) -> None:
    expected = _shapes(arch)
    if expected != got:
        missing = sorted(set(expected) - set(got))
        wrong = [k for k in expected if k in got and expected[k] != got[k]]   # model order: first layer first
        detail = (f"missing {missing[:3]}" if missing else
                  f"{wrong[0]} is {list(got[wrong[0]])}, expected {list(expected[wrong[0]])}" if wrong else
                  f"unexpected {sorted(set(got) - set(expected))[:3]}")
        raise RnnscopeError(f"{source} does not match architecture {arch.arch} "
                            f"{arch.layers}x{arch.hidden} (embed {arch.embed}, vocab {arch.vocab_size}): {detail}",
                            "give the architecture the weights were trained with")


def _read_weights(path: Path, arch: Architecture, source: str) -> dict[str, torch.Tensor]:
    """The weights, their shapes checked against ``arch`` first: a safetensors file from its header
    alone, before any tensor is read."""
    try:
        if path.suffix == ".safetensors":
            _check_header(path)
            with safe_open(str(path), "pt") as f:
                _check_shapes(arch, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, source)
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)   # never unpickle code
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise RnnscopeError(f"{path} is corrupt or truncated ({first_line(err, 120)})",
                            "restore the file from its source or retrain it") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RnnscopeError(f"{path} does not hold a state_dict of tensors", "save it with torch.save(model.state_dict())")
    _check_shapes(arch, {k: tuple(v.shape) for k, v in state.items()}, source)
    return state


def _check_header(path: Path) -> None:
    """Refuse a safetensors file whose header (its first 8 bytes give its length) is beyond ``HEADER_LIMIT``."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= HEADER_LIMIT:
        raise RnnscopeError(f"{path} has a safetensors header of {size:,} bytes"
                            + (f", more than the {HEADER_LIMIT >> 20} MB a header of names and shapes needs"
                               if size > 0 else " (not a safetensors file)"), RESTORE)


def _build(arch: Architecture, vocab: Vocab, weights: Path, source: str) -> CharModel:
    if len(vocab) != arch.vocab_size:
        raise RnnscopeError(f"{source}: the vocabulary has {len(vocab)} characters but the architecture says "
                            f"vocab_size {arch.vocab_size}", "give the vocabulary the model was trained with")
    state = _read_weights(weights, arch, source)         # shapes checked before the model is built
    model = CharModel(arch)
    model.load_state_dict(state)
    return model.eval()


def load(spec: str | os.PathLike, *, arch: str | None = None, vocab: str | None = None,
         embed: int | None = None, hidden: int | None = None, layers: int | None = None,
         verify: bool = True) -> Checkpoint:
    """Load ``zoo:NAME``, a checkpoint directory, or a bare weights file (``.safetensors`` or a
    PyTorch state_dict) with its architecture given as keyword arguments.

    A directory's weights are checked against the SHA-256 on its card; a card without one is
    refused unless ``verify=False`` is passed (then no checksum is checked at all).
    """
    path, source = _resolve(spec)
    if path.is_dir():
        card = _read_card(path)
        weights = _own(path, WEIGHTS)
        regular_file(weights, "the weights file", RESTORE)
        if verify:
            sha = card.get("weights_sha256")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise RnnscopeError(f"{path / CARD} has no valid weights_sha256, so its weights cannot be verified",
                                    f"{RESTORE}, or load it unverified with load(..., verify=False)")
            if sha256_file(weights) != sha:
                raise RnnscopeError(f"{weights} is corrupt or truncated: its SHA-256 does not match the card", RESTORE)
        try:
            a = Architecture(**card["architecture"])
            v = Vocab(card["vocab"])
        except (KeyError, TypeError) as err:
            raise RnnscopeError(f"{path / CARD} lacks a valid architecture or vocab ({first_line(err, 80)})",
                                "restore the checkpoint from its source") from None
        name = source[4:] if source.startswith("zoo:") else str(card.get("name", path.name))
        return Checkpoint(_build(a, v, weights, source), v, card, name)
    if None in (arch, vocab, hidden, layers):
        raise RnnscopeError(f"{path} is a bare weights file with no card",
                            "give its architecture: arch=, vocab=, hidden=, layers= (and embed=)")
    v = Vocab(vocab)
    a = Architecture(arch, len(v), embed or hidden, hidden, layers)
    return Checkpoint(_build(a, v, path, source), v, {"name": path.stem}, path.stem)


def catalogue() -> list[dict]:
    """One row per shipped checkpoint: what ``rnnscope zoo list`` prints."""
    rows = []
    for name, path in shipped().items():
        card = load(f"zoo:{name}").card   # loading verifies the checksum: list only what works
        a = card["architecture"]
        rows.append({"name": name, "arch": a["arch"], "corpus": card["corpus"]["name"], "layers": a["layers"],
                     "hidden": a["hidden"], "params": card["params"], "val_loss": card["val_loss"],
                     "test_loss": card["test_loss"], "test_bpc": card["test_bpc"],
                     "chars_seen": card["training"]["chars_seen"]})
    return rows
