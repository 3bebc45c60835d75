"""What ``rnnscope probe`` loads, from its flags: the model by SPEC, its encoder and loss, the
modules to record and the text or corpus. The top of the stack: it composes the probe's loaders
(``rnnscope.probe.specs``, ``rnnscope.probe.corpus``) and decides nothing they do not."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from rnnscope.errors import RnnscopeError
from rnnscope.probe.corpus import read_documents
from rnnscope.probe.cells import cell_modules
from rnnscope.probe.keys import recurrent_modules
from rnnscope.probe.specs import call, load, resolve
from rnnscope.store.files import read_text

NO_MODEL = ("pass --model SPEC (zoo:NAME, a checkpoint directory, file.py:fn, package.module:fn, model.pt or "
            "weights.pt@file.py:build)")


def spec_of(checkpoint: str | None, model: str | None) -> str:
    """The one model named by ``probe CHECKPOINT`` and/or ``--model SPEC``."""
    if checkpoint and model and checkpoint != model:
        raise RnnscopeError(f"two models given: {checkpoint} and --model {model}", "give one of them")
    if not (model or checkpoint):
        raise RnnscopeError("no model given", NO_MODEL)
    return model or checkpoint


def subject_and_options(spec: str, encoder_spec=None, modules=None, loss_spec=None, carry=False):
    """The model loaded by ``spec`` and the options for ``record`` the flags asked for: only those, so
    its own defaults (loss "auto", every module, a state reset at each document, the subject's
    encoder) stand otherwise."""
    enc = encoder(encoder_spec) if encoder_spec else None
    subject = load(spec, encoder=enc)
    if getattr(subject, "encoder", True) is None:
        raise RnnscopeError(f"{spec} comes with no encoder", "pass --encoder file.py:fn, where fn() returns one")
    asked = {}
    if modules:
        asked["modules"] = choose(subject.model, modules)
    if loss_spec:
        asked["loss"] = loss(loss_spec)
    if carry:
        asked["carry"] = True
    if enc is not None:          # (a Subject holds it already; a zoo checkpoint's vocabulary gives way)
        asked["encode"] = enc
    return subject, asked


def texts_of(path: Path, max_chars: int = 0):
    """``--text``: a text file is one document, stored byte for byte (``max_chars`` cuts it); a
    directory or a ``.jsonl`` is a corpus of documents."""
    if path.is_file() and path.suffix.lower() != ".jsonl":
        text = read_text(path)
        return text[:max_chars] if max_chars else text
    if max_chars:
        raise RnnscopeError("--max-chars cuts one text file", "give a text file, or leave --max-chars out")
    return read_documents(path)


def encoder(spec: str):
    """``--encoder file.py:fn``: what ``fn()`` returns (an encoder, see ``Subject``)."""
    return call(resolve(spec, "--encoder"), spec)


def loss(spec: str):
    """``--loss none`` or ``--loss file.py:fn``: ``None`` or the function ``fn(output, ids)`` itself."""
    return None if spec == "none" else resolve(spec, "--loss")


def choose(model: nn.Module, names: list[str]) -> list[str]:
    """``--modules a,b``: checked against the model's recurrent modules."""
    known = [*recurrent_modules(model), *cell_modules(model)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RnnscopeError(f"the model has no recurrent module {', '.join(map(repr, unknown))}",
                            f"choose from {', '.join(repr(k) for k in known)}")
    return names
