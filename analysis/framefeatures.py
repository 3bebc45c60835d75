"""A frames Run's own features (its steps are input frames: audio, sensor readings, no text).

A text feature is a function of a document's text giving one number per character; a frames feature
is a function of a document giving one number per frame: ``fn(document) -> [T]``, where ``document``
is the dict the model's ``call`` got when the Run was recorded, read back from the Run: ``name``,
``times [T]`` and the fields it kept, and ``input [T, features]`` when the frames are given again
(``analyze(..., frames=read_frames(path))``, ``rnnscope analyze RUN --frames PATH``: a Run keeps no
frames), checked to be the Run's own: the same documents, lengths and time stamps.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rnnscope.errors import RnnscopeError, call_user, escaped

from rnnscope.probe.corpus import frames_sha256

from .calls import stored_fields
from .features import on_tokens

AGAIN = "pass the frames the Run was recorded from (--frames PATH [--times PATH], or frames= in Python)"


class FrameDocument(dict):
    """One document of a frames Run as its features see it; a field it lacks is one line."""

    def __missing__(self, field):
        name = escaped(str(self.get("name")), limit=60)
        if field == "input":
            raise RnnscopeError(f"document {name!r} has no \"input\": a Run keeps no frames", AGAIN)
        raise RnnscopeError(f"document {name!r} has no field {escaped(str(field), limit=40)!r} in the Run",
                            "use name, times, input (with the frames) or a field the documents were recorded with")


def frame_documents(run, frames=None) -> list[FrameDocument]:
    """The Run's documents as dicts (see the module); ``frames`` (a ``probe.corpus.Frames``) checked
    against the Run, document by document, before its inputs join them."""
    table, times = run.documents, np.asarray(run.times, np.float64)
    if frames is not None and len(frames) != len(table):
        raise RnnscopeError(f"the frames hold {len(frames):,} documents, the Run {len(table):,}", AGAIN)
    out = []
    for i, (row, fields) in enumerate(zip(table.itertuples(index=False), stored_fields(table))):
        a, b = int(row.step_start), int(row.step_end)
        doc = FrameDocument({**fields, "name": row.name, "times": times[a:b]})
        if frames is not None:
            given = frames.inputs[i]
            said = f"document {i} of the frames ({escaped(frames.names[i], limit=60)}, {len(given):,} frames)"
            if frames.names[i] != row.name or len(given) != b - a:
                raise RnnscopeError(f"{said} is not the Run's ({escaped(str(row.name), limit=60)}, {b - a:,} steps)",
                                    AGAIN)
            if not np.array_equal(frames.times[i], doc["times"]):
                raise RnnscopeError(f"{said} has other time stamps than the Run's", AGAIN + "; its times with --times")
            stamp = fields.get("frames_sha256")          # a Run recorded before the checksum: names, lengths, times
            if stamp is not None and stamp != frames_sha256(given):
                raise RnnscopeError(f"{said} holds other values than the Run was recorded from (their checksum "
                                    "differs)", AGAIN)
            doc["input"] = given
        out.append(doc)
    return out


def frame_features(run, own: Mapping, frames=None) -> dict:
    """``own`` with each function replaced by its values at every step ``[steps]``: called on each
    document (``frame_documents``), each call returning ``[T]`` numbers; an array ``[steps]`` stays as
    it is. A text feature (``on_tokens``, a built-in's name) is refused in one line."""
    docs = None
    out = {}
    for name, fn in own.items():
        if isinstance(fn, (str, on_tokens)):
            raise RnnscopeError(f"feature {name!r} is computed on text, and this Run's steps are frames without text",
                                "give a function of a document -> one number per frame, or an array per step")
        if not callable(fn):
            out[name] = fn
            continue
        docs = frame_documents(run, frames) if docs is None else docs
        parts = []
        for d in docs:
            shown = escaped(str(d["name"]), limit=60)
            v = np.asarray(call_user(fn, d, doing=f"feature {name!r} failed on document {shown!r}",
                                     fix="make it take a document (name, times, input) and return one number per frame"))
            T = len(d["times"])
            if v.shape != (T,) or not (v.dtype == bool or np.issubdtype(v.dtype, np.integer)
                                       or np.issubdtype(v.dtype, np.floating)):
                raise RnnscopeError(f"feature {name!r} gave {v.dtype} values of shape {list(v.shape)} for document "
                                    f"{shown!r} of {T:,} frames", "return one number per frame, [T]")
            parts.append(v.astype(np.float64))
        out[name] = np.concatenate(parts)
    return out
