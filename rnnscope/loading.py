"""What ``rnnscope probe`` loads, from its flags: which one model SPEC names, and the text or corpus.
The top of the stack: it composes the probe's loaders (``rnnscope.probe.corpus``) and decides nothing
they do not; the model, encoder, loss and modules come from ``rnnscope.probe.specs.subject_and_options``,
which the command line calls itself."""
from __future__ import annotations

from pathlib import Path

from rnnscope.errors import RnnscopeError
from rnnscope.probe.corpus import read_documents
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


def features_of(items: list[str]) -> tuple[list[str] | None, dict]:
    """``--features``: the built-in names (None: none named, so the Run's defaults) and the user's own
    features from each ``file.py:fn``: ``fn()`` returns a dict of name -> function ``text -> array``, or one
    such function (named ``fn``); a function that takes the text is itself the feature."""
    from rnnscope.analysis.features import own_features
    from rnnscope.probe.specs import call, resolve
    names = [i for i in items if ":" not in i] or None
    own = {}
    for spec in (i for i in items if ":" in i):
        fn = resolve(spec, "--features")
        got = call(fn, spec) if _takes_nothing(fn) else fn
        own.update(got if isinstance(got, dict) else {spec.rpartition(":")[2].rsplit(".", 1)[-1]: got})
    return names, own_features(own)


def _takes_nothing(fn) -> bool:
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def texts_of(path: Path, max_chars: int = 0):
    """``--text``: a text file is one document, stored byte for byte (``max_chars`` cuts it); a
    directory or a ``.jsonl`` is a corpus of documents."""
    if path.is_file() and path.suffix.lower() != ".jsonl":
        text = read_text(path)
        return text[:max_chars] if max_chars else text
    if max_chars:
        raise RnnscopeError("--max-chars cuts one text file", "give a text file, or leave --max-chars out")
    return read_documents(path)


def frames_of(path: str | None, times: str | None, others: dict | None = None):
    """``--frames PATH [--times PATH]``: the documents of frames (``probe.frames_files``), once the other
    flags given (flag -> value) that do not go with them are refused."""
    from rnnscope.probe.frames_files import check_frames_flags, read_frames
    if not path:
        raise RnnscopeError("--times stamps the frames of --frames", "give --frames PATH, or leave --times out")
    check_frames_flags(others or {})
    return read_frames(path, times)
