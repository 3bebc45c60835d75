"""``rnnscope analyze RUN``: every analysis the Run's data allows, written into the Run as Parquet.

    RUN/analysis/neurons.parquet       find_neurons: every unit x feature
    RUN/analysis/contexts.parquet      top_contexts: each unit's top and bottom steps with their text
    RUN/analysis/sparse.parquet        sparse_probe path per feature (with --sparse)
    RUN/analysis/saturation.parquet    gate_saturation (when gates were recorded)
    RUN/analysis/grad_norms.parquet    gradient_norms per step (when recorded with --grad)
    RUN/analysis/grad_decay.parquet    gradient_decay curve (needs the model: zoo:NAME or a checkpoint path)
    RUN/analysis/half_lives.parquet    half_lives of that curve
    RUN/analysis/ablation.parquet      ablate of each binary feature's best unit (with --ablate)
    RUN/analysis/summary.json          what ran, with which settings, and what was skipped and why

On a Run of words, subwords or several documents every table is on steps: neurons scores only steps
with text and splits by document, contexts are windows of steps inside one document, the gradient
decay never crosses a document boundary. Ablation edits a char model's input, so it runs only on a
Run of one step per character.

The tables are read and written by the Run store (``rnnscope.store.tables``): each is written
beside its final name and renamed, never through a link, and checked against its schema on read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rnnscope.errors import RnnscopeError, escaped
from rnnscope.probe import model_checksum
from rnnscope.store import Run, open_run
from rnnscope.store import inside, read_table, table_path, write_json, write_table  # noqa: F401 (re-exported)
from rnnscope.store.tables import write_tables

from .contexts import top_contexts
from .features import compute
from .gates import GATES, gate_saturation
from .gradflow import gradient_decay, gradient_norms, half_lives
from .intervene import ablate, position_mask
from .neurons import find_neurons, top_units
from .source import as_source
from .sparse import sparse_probe

TABLES = ("neurons", "contexts", "sparse", "saturation", "grad_norms", "grad_decay", "half_lives", "ablation")


def load_model(run: Run, checkpoint: str | None = None):
    """The Run's model for decay and ablation, checked against the checksum in the manifest. Returns
    ``(Checkpoint, None)`` or ``(None, why not)``.

    The model comes from ``checkpoint`` (what the user passed: ``--checkpoint``), or from a manifest
    that names one of the zoo's shipped checkpoints by name. A Run may be someone else's: a source in its
    manifest is never a path rnnscope opens (``/dev/zero``, ``/root``) nor code it runs."""
    from rnnscope import zoo
    source = run.manifest["model"].get("source")
    if checkpoint is None:
        name = source[4:] if isinstance(source, str) and source.startswith("zoo:") else None
        if name not in zoo.shipped():
            shown = escaped(source, limit=80) if isinstance(source, str) else type(source).__name__
            return None, (f"the Run was probed from {shown}, which rnnscope does not open from a Run's manifest; "
                          "pass --checkpoint with that model to compute it")
        checkpoint = source
    ck = zoo.load(checkpoint)
    if model_checksum(ck.model) != run.manifest["model"]["checksum"]:
        raise RnnscopeError(f"{checkpoint} is not the model this Run was recorded with (checksums differ)",
                            "pass --checkpoint with the checkpoint used for `rnnscope probe`")
    return ck, None


def analyze(run, *, features=None, language="auto", heldout: float = 0.3, shifts: int = 16,
            checkpoint: str | None = None, decay: bool = True, max_lag: int = 200, positions: int = 512,
            sparse: bool = False, ablation: bool = False, controls: int = 100, ablate_chars: int = 20000,
            contexts: int = 10, context_window: int = 40, progress: bool = True, log=print, client=None) -> dict:
    """Run what the Run supports, write the tables, return ``{name: DataFrame}`` (the neuron search's
    passes on the Dask ``client``'s workers when one is given)."""
    run = run if isinstance(run, Run) else open_run(run)
    for name in (*TABLES, "summary"):          # a table that cannot be written is refused before the work
        inside(run.path, f"analysis/{name}.{'json' if name == 'summary' else 'parquet'}", write=True)
    src = as_source(run, language=language)
    out, skipped = {}, {}
    ck = None
    if decay or ablation:                # first: a wrong model is refused before any long work
        ck, why = load_model(run, checkpoint)
        if ck is None:
            skipped.update({"grad_decay": why} if decay else {}, **({"ablation": why} if ablation else {}))
    out["neurons"] = find_neurons(run, features, language=language, heldout=heldout, shifts=shifts,
                                  progress=progress, client=client)
    if sparse:
        paths = []
        for feat, g in out["neurons"].groupby("feature", sort=False):
            cands = g.dropna(subset=["score"]).assign(a=lambda d: np.where(
                d.metric == "auc", d.score - 0.5, d.score.abs())).nlargest(256, "a")["unit"].tolist()
            paths.append(sparse_probe(run, feat, language=language, units=cands, heldout=heldout)
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
    if decay and ck is not None and (not isinstance(loss, dict) or loss.get("kind", "next-token") != "next-token"):
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
    if ablation and ck is not None and not src.char_level:
        skipped["ablation"] = "ablation edits a char model's input: the Run's steps are not its characters"
    elif ablation and ck is not None:
        text = run.text[:ablate_chars]
        ids = ck.vocab.encode(text, unk=run.manifest.get("unk"))
        feats = compute(text, sorted(set(out["neurons"].query("metric == 'auc'")["feature"])),
                        src.language or "c") if (out["neurons"]["metric"] == "auc").any() else pd.DataFrame()
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
               "language": src.language, "neuron_tests": tested, "exploding_steps": exploding,
               "nonfinite_gradient_steps": nonfinite}
    write_tables(run, out, {"summary": summary})     # all or none: an interrupt keeps the old tables
    out["summary"] = summary
    return out


def top_table(neurons: pd.DataFrame, k: int = 3) -> str:
    """The printed table: the ``k`` units per feature ranked first on the selection part, with their
    held-out estimate and the control task's score."""
    cols = ["feature", "unit", "metric", "direction", "selection_score", "selection_q", "heldout_score",
            "heldout_q", "selectivity"]
    t = top_units(neurons, k)[[c for c in cols if c in neurons]]
    return t.to_string(index=False, float_format=lambda v: f"{v:.3g}")


def unit_contexts(contexts: pd.DataFrame, unit: str, k: int = 5) -> str:
    """The printed top and bottom contexts of one unit: each window with the step's token (a
    character on a char Run) bracketed, control characters escaped so the terminal shows what is stored."""
    rows = contexts[contexts["unit"] == unit]
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
                     + _escape(c[b:b + CONTEXT]))
            lines.append(f"  {r['value']:+9.3f}  step {int(r['step']):>8,d}  {shown}")
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
             "selectivity: held-out score minus a control that sees only the current and previous character",
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
    return unit_contexts(table, unit, k)
