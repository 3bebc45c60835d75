"""The encoder's side of an encoder-decoder Run: the modules that read each document's source (``record(...,
source_modules=[...])``, ``probe --source-modules``) are stored as a Run of their own, ``RUN/encoder/``.

A seq2seq model reads two texts: its encoder runs over the source (S steps), its decoder over the target
(T steps). The Run's steps are the target's, so an encoder's rows cannot be among them (``check_aligned``
refuses a module whose steps are not the text's). Here they are written where they line up: a complete
Run over the source texts (its documents named as the Run's, each document's source its text, its steps
the source positions the Run's encoder makes of it), recorded in the same pass as the decoder. Every tool
reads it as it reads any Run: ``rnnscope analyze RUN/encoder --features ...`` scores the encoder's units
against features of the source, ``serve RUN/encoder`` shows them over the source text. It is written
inside the Run's unfinished folder and swapped in with it, so both appear together or neither does.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError
from rnnscope.store import documents_frame, split_key
from rnnscope.store.writer import RunWriter

from .unitstats import _UnitStats as UnitStats

FOLDER = "encoder"


class SourceSide:
    """The source modules' rows of every document, written to ``{writer.tmp}/encoder`` as a Run.
    ``sources``: ``(texts, spans)`` per document (``attention.sources_of``); ``names``: the documents'."""

    def __init__(self, writer: RunWriter, modules: list[str], sources, names: list[str], dtypes: dict):
        texts, spans = sources
        chars = np.cumsum([0] + [len(t) for t in texts])
        self.bounds = np.cumsum([0] + [len(s) for s in spans])
        joined = np.concatenate([np.where(s >= 0, s + c, -1) for s, c in zip(spans, chars)]).astype(np.int64)
        self.modules, self.names, self.dtypes, self.top = set(modules), names, dtypes, writer
        self.w = RunWriter(writer.tmp / FOLDER, "".join(texts), spans=joined.reshape(-1, 2),
                           documents=documents_frame(names, chars, self.bounds), dtype=writer.dtype)
        self.arrays: dict = {}
        self.stats: dict[str, UnitStats] = {}
        self.bad: dict[str, dict] = {}

    def keys_of(self, trace) -> dict[str, int]:
        """Key -> units of the source modules in ``trace`` (the dry run's)."""
        return {k: trace[k].shape[-1] for k in trace if split_key(k)["module"] in self.modules}

    def open(self, layout: dict[str, int]) -> None:
        self.layout = layout
        for k, u in layout.items():
            self.arrays[k] = self.w.states(k, u, self.dtypes.get(k))
            self.top.rows.append(self.arrays[k])        # closed with the Run's rows, whatever happens
            self.stats[k] = UnitStats(u)
            self.bad[k] = {"nonfinite": 0, "overflow": 0, "underflow": 0}

    def add(self, trace, d: int, to_dtype) -> None:
        """Document ``d``'s rows of every source key from one whole-document pass's ``trace``."""
        a, b = int(self.bounds[d]), int(self.bounds[d + 1])
        for k, rows in self.arrays.items():
            t = trace[k] if k in trace else None
            if t is None or tuple(t.shape[:2]) != (1, b - a):
                got = "was not called" if t is None else (f"ran {t.shape[1]:,} steps" if t.shape[0] == 1
                                                          else f"ran a batch of {t.shape[0]}")
                raise RnnscopeError(f"the source module {split_key(k)['module']!r} {got} in document "
                                    f"{self.names[d]!r}, whose source the encoder makes {b - a:,} steps",
                                    "make the model run it once over the encoded source [1, S], or leave it out of "
                                    "--source-modules")
            h = t[0].detach()
            rows.write(a, to_dtype(h, self.dtypes.get(k)))
            for what, count in zip(("nonfinite", "overflow", "underflow"),
                                   self.stats[k].add(h.numpy(), self.dtypes.get(k) or self.w.dtype)):
                self.bad[k][what] += count

    def commit(self, manifest: dict) -> dict:
        """Finish ``encoder/`` (``manifest``: the Run's model, tokenizer name and recording fields) and give
        the Run's manifest entry for it."""
        layout = self.layout
        spans, chars = self.w.spans, self.w.chars
        identity = len(spans) == chars and np.array_equal(spans, np.stack([np.arange(chars), np.arange(1, chars + 1)], 1))
        self.w.units(pd.concat([self.stats[k].frame(k) for k in layout], ignore_index=True))
        self.w.commit({**manifest, "loss": None, "side": "source",
                       "encoder": {"kind": "char" if identity else "spans", "name": manifest.get("encoder_name")},
                       "kinds": sorted({split_key(k)["kind"] for k in layout}), "modules": sorted(self.modules),
                       "keys": {k: {"units": u, **self.bad[k]} for k, u in layout.items()},
                       "nonfinite": any(v["nonfinite"] or v["overflow"] for v in self.bad.values())})
        return {"folder": FOLDER, "modules": sorted(self.modules), "keys": sorted(layout),
                "steps": int(self.bounds[-1])}
