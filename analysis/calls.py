"""A user's model over documents, as the causal tools (``ablate``, ``decay_through``) run it.

A ``Subject``'s ``call`` takes ids ``[1, T]``: the model runs one whole document per call, never
batched, so its ``call``, its loss and the user's metric see exactly what ``record`` gave them (a
``call`` or metric taking a ``document`` keyword gets the document's dict: name, text and the
fields of its ``.jsonl`` line, a label). A metric is the Subject's loss or any
``fn(output, ids [T][, document=]) ->`` a scalar (one per document), a per-step ``[T]``, or a dict of
named scalars or per-step values (a loss and an accuracy at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rnnscope.errors import RnnscopeError, call_user, escaped
from rnnscope.probe.corpus import documents_of
from rnnscope.probe.encoders import as_encoder
from rnnscope.probe.steploss import first_tensor
from rnnscope.probe.subject import takes_document

METRIC_FIX = "return a scalar per document, one value per step [T], or a dict of them"


@dataclass
class Doc:
    """One document as its model sees it: ``ids [1, T]``, the ``document`` dict, its first step in the Run."""
    ids: torch.Tensor
    document: dict
    start: int = 0


def encoded(subject, documents) -> list[Doc]:
    """``documents`` (a str, a list of str or of dicts with a ``text``, a dict, ``read_documents(path)``)
    through the Subject's encoder, steps numbered from 0 across them in order."""
    if subject.encoder is None:
        raise RnnscopeError("the model comes with no encoder", "give the Subject an encoder (or --encoder)")
    enc, docs, out, start = as_encoder(subject.encoder), documents_of(documents), [], 0
    for i in range(len(docs)):
        ids, _ = enc.encode(docs.texts[i])
        out.append(Doc(torch.as_tensor(ids, dtype=torch.long)[None], docs.document(i), start))
        start += len(ids)
    return out


def stored_fields(frame) -> list[dict]:
    """Each document's own fields from a Run's documents table (the columns after the layout's; None
    where a document lacks one), numbers as Python numbers."""
    from rnnscope.store.docfields import LAYOUT
    extra = [c for c in frame.columns if c not in LAYOUT]
    return [{c: (v.item() if hasattr(v, "item") else v) for c, v in zip(extra, row) if v is not None}
            for row in frame[extra].itertuples(index=False)] if extra else [{}] * len(frame)


def run_documents(run, corpus=None, subject=None) -> list[Doc]:
    """The Run's documents with the ids it recorded (a format 1 Run's encoded by ``subject``'s encoder);
    their fields (a label) those the Run keeps, or from ``corpus``: the documents it was probed from
    (``read_documents(path)``; a Run written before fields were kept), checked to be the Run's own,
    name for name and text for text."""
    frame = run.documents
    fields = stored_fields(frame)              # the fields the Run was probed with (none in an older Run)
    if corpus is not None:
        docs = documents_of(corpus)
        if len(docs) != len(frame):
            raise RnnscopeError(f"the corpus holds {len(docs):,} documents, the Run {len(frame):,}",
                                "give the corpus the Run was probed from (--documents)")
        for i, (name, text) in enumerate(docs):
            a, b = int(frame.char_start.iloc[i]), int(frame.char_end.iloc[i])
            if name != frame.name.iloc[i] or text != run.text[a:b]:
                raise RnnscopeError(f"document {i} of the corpus ({escaped(name, limit=60)}) is not the Run's "
                                    f"({escaped(str(frame.name.iloc[i]), limit=60)})",
                                    "give the corpus the Run was probed from (--documents)")
        fields = [docs.document(i) for i in range(len(docs))]
    ids = None if run.ids is None else np.asarray(run.ids)
    if ids is None:
        ids = encoded(subject, run.text)[0].ids[0].numpy() if subject is not None else None
        if ids is None or len(ids) != len(run):
            raise RnnscopeError("the Run keeps no ids and its text does not encode to its steps",
                                "probe the text again with this rnnscope")
    out = []
    for i, row in enumerate(frame.itertuples(index=False)):
        a, b = int(row.step_start), int(row.step_end)
        document = {**fields[i], "name": row.name, "text": run.text[int(row.char_start):int(row.char_end)]}
        out.append(Doc(torch.as_tensor(ids[a:b], dtype=torch.long)[None], document, a))
    return out


def forward(subject, doc: Doc):
    """The Subject's ``call(model, ids [1, T][, document=])``, or ``model(ids)``."""
    call = subject.call or _model_call
    extra = {"document": doc.document} if takes_document(call) else {}
    return call_user(call, subject.model, doc.ids, **extra,
                     doing=f"the model failed on document {escaped(str(doc.document.get('name')), limit=60)}",
                     fix="make the model (or Subject(call=...)) take the encoder's ids [1, T]")


def _model_call(model, ids):
    return model(ids)


def metric_of(subject, metric=None):
    """The function to measure: ``metric``, else the Subject's loss (``"auto"``: next-token cross-entropy)."""
    fn = subject.loss if metric is None else metric
    if fn is None:
        raise RnnscopeError("there is nothing to measure: the model has no loss",
                            "pass metric=fn(output, ids, document) (on the command line --loss file.py:fn)")
    if isinstance(fn, str):
        if fn != "auto":
            raise RnnscopeError(f"metric {fn!r} is not 'auto' or a function", "pass fn(output, ids[, document])")
        return next_token_loss
    if not callable(fn):
        raise RnnscopeError(f"the metric is a {type(fn).__name__}", "pass fn(output, ids[, document])")
    return fn


def next_token_loss(output, ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` nats: the loss at t predicts id t+1 (NaN at the last step, which has no next id)."""
    logits = first_tensor(output)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == len(ids)):
        raise RnnscopeError("the model's output is not next-token logits [1, T, V]",
                            "pass the loss the model was probed with (loss=, --loss file.py:fn)")
    loss = F.cross_entropy(logits[0, :-1], ids[1:], reduction="none")
    return torch.cat([loss, loss.new_full((1,), float("nan"))])


def measure(fn, output, doc: Doc, *, keep_graph: bool = False) -> dict:
    """``fn`` on one document's output: name -> a float64 scalar or ``[T]`` array (tensors, when
    ``keep_graph``, for a backward through them). A single value is named after the function."""
    T = doc.ids.shape[1]
    extra = {"document": doc.document} if takes_document(fn) else {}
    value = call_user(fn, output, doc.ids[0], **extra, fix=METRIC_FIX,
                      doing=f"the metric failed on document {escaped(str(doc.document.get('name')), limit=60)}")
    values = value if isinstance(value, dict) else {getattr(fn, "__name__", "metric"): value}
    out = {}
    for name, v in values.items():
        t = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
        if t.dim() > 1 or (t.dim() == 1 and len(t) != T) or t.is_complex():
            raise RnnscopeError(f"the metric {escaped(str(name), limit=40)} gave shape {list(t.shape)} for a "
                                f"document of {T} steps", METRIC_FIX)
        out[str(name)] = t if keep_graph else t.detach().double().numpy()
    return out
