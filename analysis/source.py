"""What an analysis reads: a Run on disk, or an in-memory trace with its text.

Both become a ``Source``: the text, ``key -> [steps, units]`` arrays (memory-mapped for a Run, never
loaded whole) split into states (``h c i f g o r z n``) and gradients (``grad_*``), and the step
layout: each step's character span (``(-1, -1)`` for a step without text: BOS, EOS, padding) and the
documents, each a run of steps whose state was reset at its start. A zoo Run (and an in-memory trace
with ``text=``) is the simplest layout: one step per character, one document.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError
from rnnscope.store import Run, StepLayout, char_spans, check_steps, one_document, parse_key

CORPUS_LANGUAGE = {"linux": "c", "python": "python", "shakespeare": None}


@dataclass
class Source(StepLayout):
    """``spans [steps, 2]`` (None: one step per character of ``text``) and ``documents`` (columns
    name, char_start, char_end, step_start, step_end; None: the whole text is one document)."""
    text: str
    arrays: dict                      # key -> array-like [steps, units]
    run: Run | None = None
    language: str | None = "c"
    meta: dict = field(default_factory=dict)
    spans: np.ndarray | None = None
    documents: pd.DataFrame | None = None
    defaults: list[str] | None = None  # the built-in features that suit the text (None: those of ``language``)

    def __post_init__(self):
        if self.spans is None:
            self.spans = char_spans(len(self.text))
        self.spans = np.asarray(self.spans, np.int64)
        if self.spans.ndim != 2 or self.spans.shape[1] != 2:
            raise RnnscopeError(f"spans have shape {list(self.spans.shape)}", "pass spans as [steps, 2] (start, end)")
        if self.documents is None:
            self.documents = one_document(len(self.text), len(self.spans))
        bounds = self.documents[["step_start", "step_end"]].to_numpy(np.int64).ravel()
        if bounds[0] != 0 or bounds[-1] != len(self.spans) or (np.diff(bounds) < 0).any() \
                or (bounds[1:-1:2] != bounds[2::2]).any():
            raise RnnscopeError("the documents do not tile the steps in order",
                                "give each document step_start = the previous step_end, from 0 to the last step")

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def frames(self) -> bool:
        """Whether the steps are input frames without text (a frames Run's): every step is then scored."""
        return (self.meta.get("encoder") or {}).get("kind") == "frames"

    def tokens(self) -> list[str]:
        """The text of every step ('' for a step without text)."""
        return self.step_tokens(self.text)

    @property
    def state_keys(self) -> list[str]:
        return [k for k in self.arrays if not parse_key(k)["kind"].startswith("grad_")]

    @property
    def grad_keys(self) -> list[str]:
        return [k for k in self.arrays if parse_key(k)["kind"].startswith("grad_")]

    def array(self, key: str):
        """``[steps, units]`` of ``key``, checked to have one row per step."""
        if key not in self.arrays:
            raise RnnscopeError(f"no key {key!r} in this source", f"use one of {', '.join(self.arrays)}")
        a = self.arrays[key]
        if a.shape[0] != self.steps:
            what = "characters" if self.char_level or self.steps == len(self.text) else "steps"
            n = len(self.text) if what == "characters" else self.steps
            raise RnnscopeError(f"{key} has {a.shape[0]} steps but the text has {n} {what}",
                                "analyse the text the Run was recorded on")
        return a

    def need(self, kinds: set[str], what: str, fix: str) -> list[str]:
        keys = [k for k in self.arrays if parse_key(k)["kind"] in kinds]
        if not keys:
            where = self.run.path if self.run else "the trace"
            raise RnnscopeError(f"{where} has no {'/'.join(sorted(kinds))} keys, which {what} needs", fix)
        return keys


def corpus_of(run: Run) -> str | None:
    """The zoo corpus a char model of the zoo was trained on (``linux``, ``python``, ``shakespeare``), from
    the Run's manifest; None for any other model, whose language rnnscope does not know."""
    model = run.manifest.get("model") or {}
    if (run.manifest.get("encoder") or {}).get("kind", "char") != "char":
        return None
    corpus = model.get("corpus")                    # recorded from the card since the corpus was named there
    if not isinstance(corpus, str):
        name = model.get("card_name") or ""         # a Run from before: a zoo checkpoint's name ends in it
        corpus = name.rsplit("-", 1)[-1] if "-" in name else None
    return corpus if corpus in CORPUS_LANGUAGE else None


def language_of(run: Run) -> str | None:
    """The lexer for code features: from the checkpoint's corpus (linux -> c, python -> python,
    prose -> None); 'c' when the Run does not say (code features are then computed only when asked)."""
    corpus = corpus_of(run)
    return CORPUS_LANGUAGE[corpus] if corpus else "c"


def default_features(run: Run | None, language="auto") -> list[str]:
    """The built-in features scored when none are named: those of ``language`` when one is given (None:
    prose), else of the zoo corpus the Run's model was trained on, else the language-free ones."""
    from . import features as feats
    if language == "auto":
        corpus = corpus_of(run) if run is not None else None
        if corpus is None:
            return list(feats.LANGUAGE_FREE)
        language = CORPUS_LANGUAGE[corpus]
    return feats.defaults_for(language)


def as_source(run, text: str | None = None, language: str | None = "auto", spans=None, documents=None) -> Source:
    """``run``: a ``Source``, a ``probe.Run``, or a mapping ``key -> [time, units]`` / ``[1, time, units]``
    (a ``probe.trace``), with ``text`` giving one character per step, or ``spans [time, 2]`` giving each
    step's characters (a word or subword model's: the encoder's spans, (-1, -1) for BOS/EOS) and
    optionally ``documents`` (as a Run's); ``find_neurons(as_source(trace, text=..., spans=...))``."""
    if isinstance(run, Source):
        return run
    if isinstance(run, Run):
        if run.nonfinite:
            warnings.warn(f"{run.path} holds NaN/Inf in {', '.join(run.nonfinite)}; those units score NaN",
                          stacklevel=3)
        lang = language_of(run) if language == "auto" else language
        # a format-1 Run (one step per character, one document) has no layout of its own
        spans, docs = getattr(run, "spans", None), getattr(run, "documents", None)
        return Source(run.text, {k: run[k] for k in run.keys()}, run, lang, run.manifest, spans, docs,
                      default_features(run, language))
    if not isinstance(run, Mapping):
        raise RnnscopeError(f"cannot analyse a {type(run).__name__}",
                            "pass a probe.Run (probe.open_run) or a probe.trace with text=")
    if text is None:
        raise RnnscopeError("an in-memory trace needs its text", "pass text= (one character per step)")
    steps = len(text) if spans is None else len(spans)
    if spans is not None:
        spans = np.asarray(spans, np.int64)
        try:
            check_steps(spans, one_document(len(text), len(spans)) if documents is None else documents, len(text),
                        "the trace's spans")
        except RnnscopeError as err:
            raise RnnscopeError(err.problem, "pass the spans the encoder gave for this text") from None
    arrays = {}
    for k, v in run.items():
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if a.ndim == 3:
            if a.shape[0] != 1:
                raise RnnscopeError(f"trace key {k} has batch {a.shape[0]}; analyses read one sequence",
                                    "probe one sequence (batch 1) or pass trace[key][b] per sequence")
            a = a[0]
        if a.ndim != 2 or a.shape[0] != steps:
            has = f"{len(text)} characters" if spans is None else f"{steps} steps (spans)"
            raise RnnscopeError(f"trace key {k} has shape {list(a.shape)} but the text has {has}",
                                "pass the text the trace was recorded on" + (", and spans= (one [start, end) per "
                                "step) for a word or subword model" if spans is None else ""))
        arrays[k] = a
    return Source(text, arrays, None, "c" if language == "auto" else language, spans=spans, documents=documents)
