"""``rnnscope analyze RUN``: every analysis the Run's data allows, written into the Run as Parquet.

    RUN/analysis/neurons.parquet       find_neurons: every unit x feature
    RUN/analysis/features.parquet      the user's own features (``own=``, ``--features file.py:fn``) per step
    RUN/analysis/contexts.parquet      top_contexts: each unit's top and bottom steps with their text
    RUN/analysis/sparse.parquet        sparse_probe path per feature (with --sparse)
    RUN/analysis/saturation.parquet    gate_saturation (when gates were recorded)
    RUN/analysis/grad_norms.parquet    gradient_norms per step (when recorded with --grad)
    RUN/analysis/grad_decay.parquet    gradient_decay curve (needs the model: zoo:NAME, --checkpoint or --model SPEC)
    RUN/analysis/half_lives.parquet    half_lives of that curve
    RUN/analysis/ablation.parquet      ablate of each binary feature's best unit (with --ablate; --ablate-units)
    RUN/analysis/summary.json          what ran, with which settings, and what was skipped and why

On a Run of words, subwords or several documents every table is on steps: neurons scores only steps
with text and splits by document, contexts are windows of steps inside one document, the gradient
decay never crosses a document boundary. A zoo char model's ablation edits its input, so it runs only
on a Run of one step per character; a user's model (``--model SPEC``) is run through its own ``call``
and loss, one document per call (``analysis.causal``): decay ratios to lag 0, ablation of its loss.

The tables are read and written by the Run store (``rnnscope.store.tables``): each is written
beside its final name and renamed, never through a link, and checked against its schema on read.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from rnnscope.errors import RnnscopeError, escaped
from rnnscope.probe import model_checksum
from rnnscope.probe.corpus import read_documents
from rnnscope.store import Run, open_run
from rnnscope.store import inside, read_table, table_path, write_json, write_table  # noqa: F401 (re-exported)
from rnnscope.store.tables import write_tables

from . import causal
from .contexts import top_contexts
from .features import FeatureSkipped, compute, own_features
from .features import steps as feature_steps
from .framefeatures import frame_features
from .gates import GATES, gate_saturation
from .gradflow import gradient_decay, gradient_norms, half_lives
from .intervene import ablate, position_mask
from .neurons import find_neurons, top_units
from .source import as_source
from .sparse import sparse_probe

TABLES = ("neurons", "features", "contexts", "sparse", "saturation", "grad_norms", "grad_decay", "half_lives", "ablation")


def load_model(run: Run, checkpoint: str | None = None, *, model: str | None = None, encoder: str | None = None,
               loss: str | None = None):
    """The Run's model for decay and ablation, checked against the checksum in the manifest. Returns
    ``(Checkpoint or Subject, None)`` or ``(None, why not)``.

    The model comes from ``model`` (``--model SPEC``, with ``--encoder`` and ``--loss`` specs: the grammar
    and loader of ``rnnscope probe``), from ``checkpoint`` (``--checkpoint``), or from a manifest that names
    one of the zoo's shipped checkpoints by name. A Run may be someone else's: a source in its manifest is
    never a path rnnscope opens (``/dev/zero``, ``/root``) nor code it runs."""
    from rnnscope import zoo
    if model is not None:
        return _own_model(run, model, encoder, loss, checkpoint), None
    source = run.manifest["model"].get("source")
    if checkpoint is None:
        name = source[4:] if isinstance(source, str) and source.startswith("zoo:") else None
        if name not in zoo.shipped():
            shown = escaped(source, limit=80) if isinstance(source, str) else type(source).__name__
            return None, (f"the Run was probed from {shown}, which rnnscope does not open from a Run's manifest; "
                          "pass --checkpoint (a zoo model) or --model SPEC with that model to compute it")
        checkpoint = source
    ck = zoo.load(checkpoint)
    _recorded_with(run, ck.model, checkpoint, "pass --checkpoint with the checkpoint used for `rnnscope probe`")
    return ck, None


def _recorded_with(run: Run, model, spec: str, fix: str) -> None:
    """Refuse ``model`` (named ``spec``) unless its checksum is the one the Run was recorded with."""
    if model_checksum(model) != run.manifest["model"]["checksum"]:
        raise RnnscopeError(f"{spec} is not the model this Run was recorded with (checksums differ)", fix)


def _own_model(run: Run, spec: str, encoder: str | None, loss: str | None, checkpoint: str | None):
    """``--model SPEC`` loaded as ``rnnscope probe`` loads it: a zoo Checkpoint stays one (unless
    ``--encoder`` or ``--loss`` makes it a Subject), anything else is a Subject with those replaced."""
    from rnnscope.probe.specs import subject_and_options
    from rnnscope.probe.subject import Subject, subject_of
    if checkpoint is not None and checkpoint != spec:
        raise RnnscopeError(f"two models given: --checkpoint {checkpoint} and --model {spec}", "give one of them")
    got, asked = subject_and_options(spec, encoder, None, loss)
    if isinstance(got, Subject) or asked:
        got = subject_of(got)
        got.loss = asked.get("loss", got.loss)
        got.encoder = asked.get("encode", got.encoder)
    _recorded_with(run, got.model, spec, "pass --model with the model (and weights) used for `rnnscope probe`")
    return got


def analyze(run, *, features=None, own=None, language="auto", heldout: float = 0.3, shifts: int = 16,
            checkpoint: str | None = None, decay: bool = True, max_lag: int = 200, positions: int = 512,
            sparse: bool = False, ablation: bool = False, controls: int = 100, ablate_chars: int = 20000,
            contexts: int = 10, context_window: int = 40, progress: bool = True, log=print, client=None,
            model: str | None = None, encoder: str | None = None, model_loss: str | None = None,
            documents=None, ablate_units: list[str] | None = None, frames=None) -> dict:
    """Run what the Run supports, write the tables into the Run, return ``{name: DataFrame}`` (the neuron
    search's passes on the Dask ``client``'s workers when one is given).

    ``features``: built-in names (default: those that suit the Run: a zoo model's corpus language, else
    the language-free ones). ``own``: the user's features, scored beside them, a dict name ->
    ``text -> array[chars]`` (or ``features.on_tokens(fn)``); their values at every step are written to
    ``analysis/features.parquet`` so ``serve`` and ``export --feature NAME`` draw them without the code.

    ``model``, ``encoder``, ``model_loss``: ``--model``, ``--encoder``, ``--loss`` specs (``load_model``);
    a user's model is run through its Subject's ``call`` and loss (``analysis.causal``) over the Run's
    documents and the fields it keeps (a label), or those of ``documents`` (the corpus it was probed
    from, for a Run that keeps none); ``ablate_units``:
    the units to ablate (each alone) instead of each feature's best (``ablation`` then need not be set).

    On a frames Run (steps over input frames, no text) no built-in feature applies: ``own`` maps names to
    functions of a document -> one number per frame (``framefeatures``; ``frames``: the ``Frames`` the
    Run was recorded from, which give each document its ``input``) or to arrays ``[steps]``."""
    run = run if isinstance(run, Run) else open_run(run)
    for name in (*TABLES, "summary"):          # a table that cannot be written is refused before the work
        inside(run.path, f"analysis/{name}.{'json' if name == 'summary' else 'parquet'}", write=True)
    src = as_source(run, language=language)
    own = own_features(own) if own else {}      # checked once, before any work
    if src.frames and not own and not features:
        raise RnnscopeError("this Run's steps are frames without text, so no built-in feature applies",
                            "give your own: --features feats.py:fn, fn(document) -> one number per frame")
    if frames is not None and not src.frames:
        raise RnnscopeError("frames were given for a Run whose steps are text", "leave --frames out")
    own = frame_features(run, own, frames) if src.frames else own       # functions of a document -> [steps]
    out, skipped = {}, {}
    ck, docs = None, None
    ablation = ablation or bool(ablate_units)
    if src.frames and (decay or ablation):      # the causal tools run a model over ids, not yet over frames
        why = "a model is not yet run again over a frames Run's documents"
        skipped.update({"grad_decay": why} if decay else {}, **({"ablation": why} if ablation else {}))
        decay = ablation = False
    if decay or ablation:                # first: a wrong model is refused before any long work
        ck, why = load_model(run, checkpoint, model=model, encoder=encoder, loss=model_loss)
        if ck is None:
            skipped.update({"grad_decay": why} if decay else {}, **({"ablation": why} if ablation else {}))
        docs = _own_documents(run, ck, documents, skipped, decay, ablation)
    names = list(features) if features is not None else [] if src.frames else src.defaults
    if own:                                     # the user's code runs once: its values per step are scored and stored
        with warnings.catch_warnings():         # constant on one document is no news (said below when on all)
            warnings.simplefilter("ignore")
            tracks = feature_steps(src, own, src.language or "c")
        out["features"] = tracks.assign(step=np.arange(len(tracks)))[["step", *tracks.columns]]
    chosen = {**{n: n for n in names}, **{k: tracks[k].to_numpy() for k in own}} if own else features
    with warnings.catch_warnings():             # said once below, as one line each, not as a warning
        warnings.simplefilter("ignore", FeatureSkipped)
        out["neurons"] = find_neurons(src, chosen, language=language, heldout=heldout, shifts=shifts,
                                      progress=progress, client=client)
    skipped.update({f"feature {k}": why for k, why in out["neurons"].attrs.get("skipped_features", {}).items()})
    if sparse:
        paths = []
        for feat, g in out["neurons"].groupby("feature", sort=False):
            cands = g.dropna(subset=["score"]).assign(a=lambda d: np.where(
                d.metric == "auc", d.score - 0.5, d.score.abs())).nlargest(256, "a")["unit"].tolist()
            asked = {feat: own[feat]} if feat in own else feat
            paths.append(sparse_probe(run, asked, language=language, units=cands, heldout=heldout, client=client)
                         .assign(units_needed=lambda d: d.attrs.get("units_needed")))
        out["sparse"] = pd.concat(paths, ignore_index=True)
    if any(k.rsplit(".", 1)[1] in GATES for k in src.state_keys):
        out["saturation"] = gate_saturation(run, client=client)
    else:
        types = {m["type"] for m in run.manifest["model"].get("modules", {}).values()}
        skipped["saturation"] = ("a plain RNN has no gates" if types == {"RNN"}
                                 else "no gates recorded (probe without --kinds)")
    if contexts:
        out["contexts"] = top_contexts(run, k=contexts, window=context_window, progress=progress, client=client)
    if src.grad_keys:
        norms = gradient_norms(run, client=client)
        exploding, nonfinite = norms.attrs["exploding"], norms.attrs["nonfinite"]
        out["grad_norms"] = norms.reset_index()
    else:
        exploding = nonfinite = None
        skipped["grad_norms"] = "no gradients recorded (probe with --grad)"
    loss = run.manifest.get("loss")            # format 1 has no "kind": its loss is next-character
    if decay and docs:
        found, why = causal.own_decay(ck, docs, positions=positions, max_lag=max_lag, progress=progress)
        out.update(found)
        skipped.update({"grad_decay": why} if why else {})
    elif decay and docs is not None:
        pass                            # said in skipped: the model has no loss here
    elif decay and ck is not None and (not isinstance(loss, dict) or loss.get("kind", "next-token") != "next-token"):
        skipped["grad_decay"] = "the Run has no next-token loss to follow back"
    elif decay and ck is not None:
        stored = getattr(run, "ids", None)
        ids = (ck.vocab.encode(run.text, unk=run.manifest.get("unk")) if stored is None
               else torch.as_tensor(np.asarray(stored), dtype=torch.long)[None])
        bounds = src.step_bounds
        if (bounds[:, 1] - bounds[:, 0]).max() > max_lag + 60:
            out["grad_decay"] = gradient_decay(ck.model, ids, positions=positions, max_lag=max_lag,
                                               progress=progress, documents=bounds)
            out["half_lives"] = half_lives(out["grad_decay"])
        else:
            skipped["grad_decay"] = (f"the text is shorter than {max_lag + 60} characters" if src.char_level
                                     else f"every document is shorter than {max_lag + 60} steps")
    if ablation and docs:
        table = causal.own_ablation(run, src, ck, docs, out["neurons"], units=ablate_units, controls=controls,
                                    steps=ablate_chars, progress=progress, log=log, own=own)
        out.update({"ablation": table} if table is not None else {})
        skipped.update({} if table is not None else {"ablation": "no binary feature has a best unit to ablate"})
    elif ablation and docs is not None:
        pass
    elif ablation and ck is not None and ablate_units:
        skipped["ablation"] = "--ablate-units runs through a model's call: give it with --model SPEC"
    elif ablation and ck is not None and not src.char_level:
        skipped["ablation"] = "ablation edits a char model's input: the Run's steps are not its characters"
    elif ablation and ck is not None:
        text = run.text[:ablate_chars]
        ids = ck.vocab.encode(text, unk=run.manifest.get("unk"))
        binary = sorted(set(out["neurons"].query("metric == 'auc'")["feature"]))
        feats = compute(text, {n: own.get(n, n) for n in binary}, src.language or "c") if binary else pd.DataFrame()
        means = run.units.set_index("key")
        rows = []
        for feat in feats.columns:
            best = top_units(out["neurons"].query("feature == @feat"), 1)
            if best.empty or feats[feat].to_numpy().min() == feats[feat].to_numpy().max():
                continue
            unit, key = best.iloc[0]["unit"], best.iloc[0]["key"]
            m = {key: means.loc[key].sort_values("index")["mean"].to_numpy()}
            res = ablate(ck.model, ids, [unit], position_mask(text, feats[feat].to_numpy()), controls=controls,
                         means=m, progress=progress)
            rows.append(res.assign(feature=feat))
            log(f"ablate {unit} ({feat}): effect {res.iloc[0]['effect']:+.4f} nats on its positions, "
                f"{res.iloc[0]['effect_elsewhere']:+.4f} elsewhere; beats {res.iloc[0]['beats_controls']:.0%} "
                f"of {controls} random units")
        if rows:
            out["ablation"] = pd.concat(rows, ignore_index=True)
    tested = {k: v for k, v in out["neurons"].attrs.items() if isinstance(v, (int, float, str))}
    summary = {"tables": sorted(out), "skipped": skipped, "heldout": heldout, "shifts": shifts,
               "language": src.language, "features": sorted(set(out["neurons"]["feature"])), "neuron_tests": tested,
               "exploding_steps": exploding, "nonfinite_gradient_steps": nonfinite}
    write_tables(run, out, {"summary": summary})     # all or none: an interrupt keeps the old tables
    out["summary"] = summary
    return out


def _own_documents(run: Run, model, corpus, skipped: dict, decay: bool, ablation: bool):
    """For a user's model (a Subject, not a zoo char model): the Run's documents as its call sees them,
    or ``[]`` with the reason said in ``skipped`` when it has no loss here; None for a zoo model."""
    from rnnscope.probe.subject import Subject
    if not isinstance(model, Subject):
        return None
    why = causal.nothing_to_measure(run, model)
    if why:
        skipped.update({"grad_decay": why} if decay else {}, **({"ablation": why} if ablation else {}))
        return []
    return causal.documents(run, model, None if corpus is None else read_documents(corpus))


def top_table(neurons: pd.DataFrame, k: int = 3) -> str:
    """The printed table: the ``k`` units per feature ranked first on the selection part, with their
    held-out estimate and the control task's score."""
    cols = ["feature", "unit", "metric", "direction", "selection_score", "selection_q", "heldout_score",
            "heldout_q", "selectivity"]
    t = top_units(neurons, k)[[c for c in cols if c in neurons]]
    return t.to_string(index=False, float_format=lambda v: f"{v:.3g}")


def unit_contexts(contexts: pd.DataFrame, unit: str, k: int = 5, documents: pd.DataFrame | None = None,
                  times: np.ndarray | None = None) -> str:
    """The printed top and bottom contexts of one unit: each window with the step's token (a
    character on a char Run) bracketed, control characters escaped so the terminal shows what is stored;
    with the Run's ``documents`` (several), each window's document as ``doc N: name`` (N from 0); with a
    frames Run's ``times [steps]``, each step's time stamp in place of the text it has none of."""
    rows = contexts[contexts["unit"] == unit]
    ends = None if documents is None or len(documents) < 2 else np.asarray(documents["step_end"], np.int64)
    if rows.empty:
        raise RnnscopeError(f"no contexts for {unit}", "check the unit (KEY:INDEX) against run.keys()")
    lines = []
    for side, g in rows.groupby("side", sort=False):
        lines.append(f"{escaped(side, limit=40)} {min(k, len(g))} of {escaped(unit, limit=80)}:")
        for _, r in g.sort_values("rank").head(k).iterrows():
            c, o = str(r["context"]), int(r["offset"])
            a, b = (int(r["token_start"]), int(r["token_end"])) if "token_start" in r else (o, o + 1)
            a, b = (a, b) if a >= 0 else (len(c), len(c))        # a step without text: empty brackets
            # a window is a few dozen characters; one from someone else's table may be a megabyte
            shown = (_escape(c[max(0, a - CONTEXT):a]) + "[" + _escape(c[a:b][:CONTEXT]) + "]"
                     + _escape(c[b:b + CONTEXT])) if times is None else \
                f"time {times[int(r['step'])]:g}" if 0 <= int(r["step"]) < len(times) else "time ?"
            where = ""
            if ends is not None:            # the document holding the step (one past the end: a stale table's)
                d = int(np.searchsorted(ends, int(r["step"]), side="right"))
                where = f"doc {d}: {escaped(documents['name'].iloc[d], limit=40)}  " if d < len(ends) else "doc ?  "
            lines.append(f"  {r['value']:+9.3f}  step {int(r['step']):>8,d}  {where}{shown}")
    return "\n".join(lines)


# characters shown on each side of a context's token (and of the token itself) on one printed line
CONTEXT = 120


def _escape(text: str) -> str:
    """Every character escaped that a terminal would act on (or that would make a line two), and the
    backslash doubled so an escape stored in the text reads differently from one made here."""
    return escaped(text.replace("\\", "\\\\"), limit=None)


def report_lines(out: dict, heldout: float, top: int) -> list[str]:
    """What ``rnnscope analyze`` prints of ``analyze``'s result ``out``."""
    tests = out["summary"]["neuron_tests"]
    lines = [f"\ntop units per feature, ranked on the first {1 - heldout:.0%} of the text (selection_*), "
             f"estimated on the rest (heldout_*); selection_q: Benjamini-Hochberg over "
             f"{tests.get('tests', 'all')} unit x feature tests, heldout_q over the selected units; "
             + ("selectivity: held-out score minus a control that sees only the current and previous character"
              if out["neurons"]["control_score"].notna().any() else
              "selectivity: none (no characters or tokens for a control to see)"),
             top_table(out["neurons"], top)]
    if "half_lives" in out:
        lines += ["\ngradient half-life through time (steps):",
                  out["half_lives"][["key", "half_life", "lag_to_1pct", "exploding", "nonfinite"]].to_string(index=False)]
    lines += [f"warning: {key} is NaN or infinite at {n:,} steps"
              for key, n in (out["summary"]["nonfinite_gradient_steps"] or {}).items() if n]
    lines += [f"skipped {name}: {why}" for name, why in out["summary"]["skipped"].items()]
    return lines


def unit_report(run: Run, unit: str, k: int) -> str:
    """``analyze RUN --unit KEY:I``: that unit's top and bottom contexts, from the Run's table or
    computed for its key alone (when the table lacks the unit or holds fewer than ``k`` a side)."""
    from .contexts import top_contexts
    key, index = unit.rsplit(":", 1)
    if key not in run.keys() or int(index) >= run[key].shape[1]:
        raise RnnscopeError(f"the Run has no unit {unit}", f"use a key of {', '.join(run.keys()[:6])}, ... "
                            "with an index below its width")
    table = read_table(run, "contexts")
    if table is None or unit not in set(table["unit"]) or table["rank"].max() + 1 < k:
        table = top_contexts(run, k=min(k, len(run)), keys=[key], progress=False)
    return unit_contexts(table, unit, k, run.documents, run.times if run.frames else None)
