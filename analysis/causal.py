"""What ``rnnscope analyze --model SPEC`` runs on a user's model: the gradient decay and the ablation
through the Subject's ``call`` and loss, over the Run's own documents and ids.

A Run keeps each document's fields (a ``.jsonl`` line's label); for a Run without them they come from
the corpus given again (``--documents``), checked to be the Run's, and a ``call`` or loss that reads a
field the Run does not hold is told so in one line.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError, escaped
from rnnscope.probe.keys import recurrent_modules

from . import features as feats
from .calls import Doc, forward, measure, metric_of, run_documents
from .gradflow import decay_through, half_lives
from .intervene import ablate_documents
from .neurons import top_units


class RunDocument(dict):
    """A document read back from a Run: its name and text; a field the Run does not keep is one line."""

    def __missing__(self, field):
        raise RnnscopeError(f"document {escaped(str(self.get('name')), limit=60)!r} has no field "
                            f"{escaped(str(field), limit=40)!r} in the Run (a Run keeps the fields it was probed with; "
                            "one written before rnnscope kept them holds names and texts only)",
                            "pass --documents with the corpus (.jsonl) the Run was probed from")


def documents(run, subject, corpus=None) -> list:
    """The Run's documents as the Subject's call sees them (``calls.run_documents``), fields from ``corpus``;
    the first is run and measured here, so a call or loss that fails on them fails before any long work."""
    docs = run_documents(run, corpus, subject)
    for d in docs if corpus is None else []:
        d.document = RunDocument(d.document)
    measure(metric_of(subject), forward(subject, docs[0]), docs[0])   # a field it lacks: said before any work
    return docs


def nothing_to_measure(run, subject) -> str | None:
    """Why the Subject's loss cannot be followed or measured on this Run, or None."""
    if subject.loss is None or (subject.loss == "auto" and run.manifest.get("loss") is None):
        return "the model has no loss on this Run (it was probed states only); pass --loss file.py:fn"
    return None


# steps followed back through a user's model: each is one backward through its whole document (its call
# cannot batch them), and 512 of them over one 3,600-step document of the README's word LSTM took 99 s
# on a loaded machine; 128 give the geometric mean of the ratios at each lag to a few percent
POSITIONS = 128


def own_decay(subject, docs, *, positions: int, max_lag: int, progress: bool) -> tuple[dict, str | None]:
    """``{"grad_decay", "half_lives"}`` through the Subject's call (``decay_through``), or why not."""
    curve = decay_through(subject, docs, positions=min(positions, POSITIONS), max_lag=max_lag, progress=progress)
    if curve.empty or curve["lag"].max() < 2:
        return {}, "no gradient of the loss reached two steps back (documents of one or two steps?)"
    return {"grad_decay": curve, "half_lives": half_lives(curve)}, None


def first_steps(docs: list, steps: int, cut: bool) -> list:
    """The first documents holding ``steps`` steps: the one that crosses it cut there when ``cut`` (a
    per-step loss of a model that reads forwards only: its prefix's losses are the document's), else
    left out (but the first, which is always kept whole)."""
    ends = np.cumsum([d.ids.shape[1] for d in docs])
    k = int(np.searchsorted(ends, steps, side="left")) + 1
    docs, over = docs[:k], int(ends[min(k, len(ends)) - 1]) - steps
    if over > 0 and cut:
        last = docs[-1]
        docs[-1] = Doc(last.ids[:, :last.ids.shape[1] - over], last.document, last.start)
    elif over > 0 and k > 1:
        docs = docs[:-1]
    return docs


def own_ablation(run, src, subject, docs, neurons: pd.DataFrame, *, units=None, controls: int, steps: int,
                 progress: bool, log=print, own=None) -> pd.DataFrame | None:
    """``ablate_documents`` of each named unit (``units``), else of each binary feature's best unit, held at
    its mean over the Run, on the first documents holding ``steps`` steps (``first_steps``); the metric is the
    Subject's loss. A per-step loss is compared on the feature's steps and elsewhere; a loss per document
    over all the documents (``own``: the user's features by name, beside the built-ins). Returns the table
    (a ``feature`` column: the feature, or "named")."""
    probe = next(iter(measure(metric_of(subject), forward(subject, docs[0]), docs[0]).values()))
    per_step = np.ndim(probe) == 1
    docs = first_steps(docs, steps, cut=per_step and not any(m.bidirectional for m in
                                                              recurrent_modules(subject.model).values()))
    n = sum(d.ids.shape[1] for d in docs)
    targets = [(u, "named", None) for u in units or []]
    if not units and (neurons["metric"] == "auc").any():
        names = sorted(set(neurons.query("metric == 'auc'")["feature"]))
        values = feats.steps(src, {n: (own or {}).get(n, n) for n in names}, src.language or "c")
        for feat in names:
            best = top_units(neurons.query("feature == @feat"), 1)
            flags = values[feat].to_numpy()[docs[0].start:docs[0].start + n] == 1
            if best.empty or (per_step and (flags.all() or not flags.any())):
                continue
            targets.append((best.iloc[0]["unit"], feat, flags if per_step else None))
    means = run.units.set_index("key")
    for unit, _, _ in targets:
        key, index = unit.rsplit(":", 1)
        if key not in means.index or int(index) >= (means.index == key).sum():
            raise RnnscopeError(f"the Run has no unit {unit}", "name units (KEY:INDEX) of run.keys() with an index "
                                "below the key's width")
    rows = []
    for unit, feat, flags in targets:
        key = unit.rsplit(":", 1)[0]
        m = {key: means.loc[[key]].sort_values("index")["mean"].to_numpy()}
        res = ablate_documents(subject, docs, [unit], flags, controls=controls, means=m, progress=progress)
        rows.append(res.assign(feature=feat))
        t = res.iloc[0]
        log(f"ablate {unit} ({feat}): {t['metric']} changes by {t['effect']:+.4f} "
            f"{'on its steps' if flags is not None else f'over {len(docs)} documents'} (from {t['baseline']:.4f}); "
            f"larger than {t['beats_controls']:.0%} of {controls} random units of {key}")
    return pd.concat(rows, ignore_index=True) if rows else None
