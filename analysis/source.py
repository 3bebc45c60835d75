"""What an analysis reads: a Run on disk, or an in-memory trace with its text.

Both become a ``Source``: the text, and ``key -> [time, units]`` arrays (memory-mapped for a Run,
never loaded whole) split into states (``h c i f g o r z n``) and gradients (``grad_*``).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from rnnscope.probe import Run, parse_key
from rnnscope.errors import RnnscopeError

CORPUS_LANGUAGE = {"linux": "c", "python": "python", "shakespeare": None}


@dataclass
class Source:
    text: str
    arrays: dict                      # key -> array-like [time, units]
    run: Run | None = None
    language: str | None = "c"
    meta: dict = field(default_factory=dict)

    @property
    def state_keys(self) -> list[str]:
        return [k for k in self.arrays if not parse_key(k)["kind"].startswith("grad_")]

    @property
    def grad_keys(self) -> list[str]:
        return [k for k in self.arrays if parse_key(k)["kind"].startswith("grad_")]

    def array(self, key: str):
        """``[time, units]`` of ``key``, checked to have one step per character of the text."""
        if key not in self.arrays:
            raise RnnscopeError(f"no key {key!r} in this source", f"use one of {', '.join(self.arrays)}")
        a = self.arrays[key]
        if a.shape[0] != len(self.text):
            raise RnnscopeError(f"{key} has {a.shape[0]} steps but the text has {len(self.text)} characters",
                                "analyse the text the Run was recorded on")
        return a

    def need(self, kinds: set[str], what: str, fix: str) -> list[str]:
        keys = [k for k in self.arrays if parse_key(k)["kind"] in kinds]
        if not keys:
            where = self.run.path if self.run else "the trace"
            raise RnnscopeError(f"{where} has no {'/'.join(sorted(kinds))} keys, which {what} needs", fix)
        return keys


def language_of(run: Run) -> str | None:
    """The lexer for code features: from the checkpoint's corpus (linux -> c, python -> python,
    prose -> None); 'c' when the Run does not say."""
    name = (run.manifest.get("model") or {}).get("card_name") or ""
    corpus = name.rsplit("-", 1)[-1]
    return CORPUS_LANGUAGE.get(corpus, "c")


def as_source(run, text: str | None = None, language: str | None = "auto") -> Source:
    """``run``: a ``probe.Run``, or a mapping ``key -> [time, units]`` / ``[1, time, units]`` (a
    ``probe.trace``), with ``text`` giving one character per step."""
    if isinstance(run, Run):
        if run.nonfinite:
            warnings.warn(f"{run.path} holds NaN/Inf in {', '.join(run.nonfinite)}; those units score NaN",
                          stacklevel=3)
        lang = language_of(run) if language == "auto" else language
        return Source(run.text, {k: run[k] for k in run.keys()}, run, lang, run.manifest)
    if not isinstance(run, Mapping):
        raise RnnscopeError(f"cannot analyse a {type(run).__name__}",
                            "pass a probe.Run (probe.open_run) or a probe.trace with text=")
    if text is None:
        raise RnnscopeError("an in-memory trace needs its text", "pass text= (one character per step)")
    arrays = {}
    for k, v in run.items():
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if a.ndim == 3:
            if a.shape[0] != 1:
                raise RnnscopeError(f"trace key {k} has batch {a.shape[0]}; analyses read one sequence",
                                    "probe one sequence (batch 1) or pass trace[key][b] per sequence")
            a = a[0]
        if a.ndim != 2 or a.shape[0] != len(text):
            raise RnnscopeError(f"trace key {k} has shape {list(a.shape)} but the text has {len(text)} characters",
                                "pass the text the trace was recorded on")
        arrays[k] = a
    return Source(text, arrays, None, "c" if language == "auto" else language)
