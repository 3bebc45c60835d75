"""``rnnscope.load(SPEC)``: any user's PyTorch model, by name.

SPEC is one of
  * ``zoo:NAME`` or a checkpoint directory: a zoo ``Checkpoint`` (``rnnscope.zoo.load``, unchanged);
  * ``path/to/file.py:fn`` or ``package.module:fn`` (the uvicorn convention): ``fn()`` returns a
    ``Subject``, ``(model, encode[, loss])``, or the model alone (its encoder given apart). Loading a Python file runs its code, as importing does;
  * ``model.pt``, a TorchScript archive (``torch.jit.save``), with its encoder given apart
    (``encoder=``, ``--encoder file.py:fn``) or wrapped by a spec function;
  * ``weights.pt@file.py:build`` or ``weights.safetensors@pkg.mod:build``: ``build()`` makes the model
    (or a Subject / tuple holding it) and the weights are loaded into it with a strict key and shape
    check. A weights file is never unpickled (``torch.load(weights_only=True)`` or safetensors).

Every failure is one ``RnnscopeError`` line naming the file, module or attribute at fault.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from rnnscope.errors import RnnscopeError, call_user, failure, first_line

from .cells import cell_modules
from .keys import recurrent_modules
from .subject import Subject, takes_document
from . import torchscript

ARCHIVES = (".pt", ".pth", ".ts", ".ptl", ".jit", ".zip")
WEIGHTS = (".pt", ".pth", ".bin", ".safetensors")
PROTOCOL = "return a Subject, a tuple (model, encode[, loss]), or the model alone (then give --encoder)"


def load(spec, *, encoder=None, **zoo_options):
    """A ``Checkpoint`` for ``zoo:NAME`` or a checkpoint directory, else a ``Subject`` (see the module
    docstring). ``encoder``: the encoder of a bare TorchScript archive, or one replacing the spec's.
    ``zoo_options`` (``verify=``, or ``arch=, vocab=, hidden=, layers=, embed=`` for a bare zoo
    weights file) go to ``rnnscope.zoo.load`` as before."""
    from rnnscope import zoo
    spec = str(spec)
    if zoo_options:
        return zoo.load(spec, **zoo_options)
    weights, at, builder = spec.partition("@")
    if at and Path(weights).suffix.lower() in WEIGHTS:     # (an "@" elsewhere may be part of a folder's name)
        subject = _with_weights(weights, builder, spec)
    elif Path(spec).suffix.lower() in ARCHIVES and ":" not in Path(spec).name:
        subject = Subject(archive(Path(spec)), name=Path(spec).stem, source=spec)
    elif spec.startswith("zoo:") or ":" not in spec:
        return zoo.load(spec)           # its own one-line errors for a missing directory or name
    else:
        subject = as_subject(call(resolve(spec, "--model"), spec), spec)
    if encoder is not None:
        subject.encoder = encoder
    subject.call = checked_call(subject.call)
    return subject


def checked_call(call):
    """The user's ``call(model, ids[, document=])`` (or ``model(ids)``), refused in one line when it
    replaces a recurrent module of the model (rnnscope records the modules the model held: a new one
    each call recorded nothing), runs none of them, or returns None."""
    inner = call or (lambda model, ids: model(ids))

    def checked(model, ids, **document):
        held = {**recurrent_modules(model), **cell_modules(model)}
        ran: set[str] = set()
        hooks = [m.register_forward_hook(lambda *_, name=name: ran.add(name)) for name, m in held.items()]
        try:
            out = inner(model, ids, **document)
        finally:
            for h in hooks:
                h.remove()
        now = {**recurrent_modules(model), **cell_modules(model)}
        replaced = [name for name, m in held.items() if now.get(name) is not m]
        if replaced:
            raise RnnscopeError(f"the model's forward replaced its recurrent module {replaced[0]} with another",
                                "create it once, in __init__, and only call it in forward")
        if not ran:
            raise RnnscopeError(f"the model's forward never ran its recurrent module{'s' * (len(held) > 1)} "
                                f"{', '.join(list(held)[:4])}", "call it in forward (or give Subject(call=fn) that "
                                "runs the model through it)")
        if out is None:
            raise RnnscopeError("the model's call returned None", "return the model's output, e.g. return model(ids)")
        return out
    if call is not None and takes_document(call):
        return lambda model, ids, document: checked(model, ids, document=document)
    return checked


def archive(path: Path) -> nn.Module:
    """A TorchScript archive as an eager model a Probe can record (``probe.torchscript``)."""
    _existing(path, "the TorchScript archive")
    return torchscript.eager(torchscript.load_archive(path))


def _existing(path: Path, what: str) -> None:
    if not path.exists():
        raise RnnscopeError(f"{what} {path} does not exist", "check the path")
    if not path.is_file():
        raise RnnscopeError(f"{what} {path} is not a file", "give a file")


def resolve(spec: str, option: str):
    """The attribute ``fn`` of ``file.py:fn`` or ``package.module:fn``, checked callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RnnscopeError(f"{option} {spec!r} is not file.py:function or package.module:function",
                            "write e.g. models/mine.py:build or mypkg.models:build")
    module = _import_file(Path(target)) if target.endswith(".py") or "/" in target else _import_module(target)
    where = target
    value = module
    for part in attr.split("."):
        if not hasattr(value, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
            raise RnnscopeError(f"{where} has no attribute {attr!r}",
                                f"define it, or name one it has: {', '.join(defined) or '(none)'}")
        value = getattr(value, part)
    if not callable(value):
        raise RnnscopeError(f"{where}:{attr} is a {type(value).__name__}, not a function",
                            "name a function defined there")
    return value


def _import_file(path: Path):
    """Import a user's .py file under a name of its own (two files both called ``model.py`` do not
    collide), with its folder on ``sys.path`` only while it is imported (for its sibling imports)."""
    _existing(path, "the Python file")
    if path.suffix != ".py":
        raise RnnscopeError(f"{path} is not a .py file", "give a Python file, e.g. models/mine.py:build")
    path = path.resolve()
    name = "rnnscope_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    folder = str(path.parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module.__spec__.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        if isinstance(err, RnnscopeError | KeyboardInterrupt):
            raise
        if isinstance(err, SyntaxError):
            raise RnnscopeError(f"{path} line {err.lineno}: syntax error ({err.msg})", "fix the file") from None
        raise failure(err, f"importing {path} failed", where=path) from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    _by_value(module)
    return module


def _by_value(module) -> None:
    """Its functions (a feature, a model builder) pickle with their code, so a Dask worker that cannot
    import a module of this made-up name still runs them."""
    try:
        import cloudpickle
    except ImportError:             # no Dask installed: nothing pickles them
        return
    cloudpickle.register_pickle_by_value(module)


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise RnnscopeError(f"no module named {err.name!r} (from {name!r})",
                                "install it, run from the folder that holds it, or give a file path: "
                                "path/to/file.py:function") from None
        raise failure(err, f"importing {name} failed") from None
    except Exception as err:
        raise failure(err, f"importing {name} failed") from None


def call(fn, spec: str, *args):
    """``fn(*args)``, the user's code: an exception in it becomes one line naming where it was raised."""
    code = getattr(fn, "__code__", None)
    return call_user(fn, *args, doing=f"{spec} (calling {getattr(fn, '__name__', 'it')}) failed",
                     where=Path(code.co_filename) if code else None)


def as_subject(value, spec: str) -> Subject:
    """What a spec function returned, as a Subject holding at least one recurrent module."""
    if isinstance(value, Subject):
        subject = value
    elif isinstance(value, tuple | list) and len(value) in (2, 3):
        subject = Subject(value[0], value[1], *(value[2:]))
    elif isinstance(value, nn.Module):        # the model alone: its encoder comes apart (--encoder)
        subject = Subject(value)
    else:
        raise RnnscopeError(f"{spec} returned {type(value).__name__}", PROTOCOL)
    if isinstance(subject.model, torch.jit.ScriptModule):
        subject.model = torchscript.eager(subject.model)
    check_recurrent(subject.model, spec)
    subject.source = subject.source or spec
    subject.name = subject.name or type(subject.model).__name__
    return subject


def check_recurrent(model, spec: str) -> None:
    if not isinstance(model, nn.Module):
        raise RnnscopeError(f"{spec} gave a model of type {type(model).__name__}, not a torch nn.Module",
                            "return the nn.Module itself as the model")
    if not recurrent_modules(model) and not cell_modules(model):
        raise RnnscopeError(f"{spec} gave a model ({type(model).__name__}) with no nn.RNN / nn.LSTM / nn.GRU module "
                            "and no recurrent cell", "rnnscope records recurrent modules and cells (nn.LSTMCell, ..., "
                            "or one declared with rnnscope.cell): return a model that holds one")


def _with_weights(weights: str, builder: str, spec: str) -> Subject:
    """``weights@builder``: the builder's model with the weights loaded, keys and shapes checked."""
    path = Path(weights)
    _existing(path, "the weights file")
    state = read_weights(path)
    subject = as_subject(call(resolve(builder, "--model"), builder), builder)
    model = subject.model
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise RnnscopeError(f"{path} lacks {key!r}, which {builder} builds ({len(state)} keys in the file)",
                                "give the weights saved from this model's state_dict()")
        if tuple(state[key].shape) != tuple(value.shape):
            raise RnnscopeError(f"{path}: {key!r} has shape {list(state[key].shape)} but {builder} builds "
                                f"{list(value.shape)}", "build the model with the sizes it was trained with")
    extra = [k for k in state if k not in expected]
    if extra:
        raise RnnscopeError(f"{path} holds {extra[0]!r}, which {builder}'s model has no place for",
                            "give the weights saved from this model's state_dict()")
    model.load_state_dict(state, strict=True)
    subject.model = model.eval()
    subject.source = spec
    return subject


def read_weights(path: Path) -> dict:
    """A flat ``{name: tensor}`` from ``.safetensors`` or a weights-only ``torch.save`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = first_line(err, 120)
        raise RnnscopeError(f"{path} is not a weights-only state_dict ({type(err).__name__}: {first})",
                            "save it with torch.save(model.state_dict(), path) or safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise RnnscopeError(f"{path} is not a state_dict (a flat mapping of names to tensors)",
                            "save it with torch.save(model.state_dict(), path)")
    return state


def subject_and_options(spec: str, encoder_spec=None, modules=None, loss_spec=None, carry=False, frames=False):
    """The model loaded by ``spec`` and the options for ``record`` the flags asked for: only those, so
    its own defaults (loss "auto", every module, a state reset at each document, the subject's
    encoder) stand otherwise. ``frames``: the model reads frames ``[1, T, features]``, so it has no encoder."""
    enc = encoder(encoder_spec) if encoder_spec else None
    subject = load(spec, encoder=enc)
    if frames and getattr(subject, "encoder", True) is not None:       # a zoo checkpoint reads its vocabulary's ids
        raise RnnscopeError(f"{spec} comes with an encoder, so it reads text, and --frames gives it frames",
                            "give a model that takes frames [1, T, features]: fn() returns the model (or a Subject) "
                            "without an encoder")
    if not frames and getattr(subject, "encoder", True) is None:
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
