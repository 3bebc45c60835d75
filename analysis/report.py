"""``rnnscope analyze RUN``: every analysis the Run's data allows, written into the Run as Parquet.

    RUN/analysis/neurons.parquet       find_neurons: every unit x feature
    RUN/analysis/sparse.parquet        sparse_probe path per feature (with --sparse)
    RUN/analysis/saturation.parquet    gate_saturation (when gates were recorded)
    RUN/analysis/grad_norms.parquet    gradient_norms per step (when recorded with --grad)
    RUN/analysis/grad_decay.parquet    gradient_decay curve (needs the model: zoo:NAME or a checkpoint path)
    RUN/analysis/half_lives.parquet    half_lives of that curve
    RUN/analysis/ablation.parquet      ablate of each binary feature's best unit (with --ablate)
    RUN/analysis/summary.json          what ran, with which settings, and what was skipped and why

The tables are read and written by the Run store (``rnnscope.store.tables``): each is written
beside its final name and renamed, never through a link, and checked against its schema on read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError
from rnnscope.probe import Run, model_checksum, open_run
from rnnscope.store import read_table, table_path, write_json, write_table  # noqa: F401 (re-exported)

from .features import compute
from .gates import GATES, gate_saturation
from .gradflow import gradient_decay, gradient_norms, half_lives
from .intervene import ablate, position_mask
from .neurons import find_neurons, top_units
from .source import as_source
from .sparse import sparse_probe

TABLES = ("neurons", "sparse", "saturation", "grad_norms", "grad_decay", "half_lives", "ablation")


def load_model(run: Run, checkpoint: str | None = None):
    """The Run's model, from ``checkpoint`` or the source it was probed from, checked against the
    checksum in the manifest. Returns ``(Checkpoint, None)`` or ``(None, why not)``."""
    from rnnscope import zoo
    spec = checkpoint or run.manifest["model"].get("source")
    if not isinstance(spec, str) or not spec or (not spec.startswith("zoo:") and not Path(spec).exists()):
        return None, f"the model is not at {spec!r}; pass --checkpoint"
    ck = zoo.load(spec)
    if model_checksum(ck.model) != run.manifest["model"]["checksum"]:
        raise RnnscopeError(f"{spec} is not the model this Run was recorded with (checksums differ)",
                            "pass --checkpoint with the checkpoint used for `rnnscope probe`")
    return ck, None


def analyze(run, *, features=None, language="auto", heldout: float = 0.3, shifts: int = 16,
            checkpoint: str | None = None, decay: bool = True, max_lag: int = 200, positions: int = 512,
            sparse: bool = False, ablation: bool = False, controls: int = 100, ablate_chars: int = 20000,
            progress: bool = True, log=print) -> dict:
    """Run what the Run supports, write the tables, return ``{name: DataFrame}``."""
    run = run if isinstance(run, Run) else open_run(run)
    src = as_source(run, language=language)
    out, skipped = {}, {}
    ck = None
    if decay or ablation:                # first: a wrong model is refused before any long work
        ck, why = load_model(run, checkpoint)
        if ck is None:
            skipped.update({"grad_decay": why} if decay else {}, **({"ablation": why} if ablation else {}))
    out["neurons"] = find_neurons(run, features, language=language, heldout=heldout, shifts=shifts,
                                  progress=progress)
    if sparse:
        paths = []
        for feat, g in out["neurons"].groupby("feature", sort=False):
            cands = g.dropna(subset=["score"]).assign(a=lambda d: np.where(
                d.metric == "auc", d.score - 0.5, d.score.abs())).nlargest(256, "a")["unit"].tolist()
            paths.append(sparse_probe(run, feat, language=language, units=cands, heldout=heldout)
                         .assign(units_needed=lambda d: d.attrs.get("units_needed")))
        out["sparse"] = pd.concat(paths, ignore_index=True)
    if any(k.rsplit(".", 1)[1] in GATES for k in src.state_keys):
        out["saturation"] = gate_saturation(run)
    else:
        types = {m["type"] for m in run.manifest["model"].get("modules", {}).values()}
        skipped["saturation"] = ("a plain RNN has no gates" if types == {"RNN"}
                                 else "no gates recorded (probe without --kinds)")
    if src.grad_keys:
        norms = gradient_norms(run)
        exploding = norms.attrs["exploding"]
        out["grad_norms"] = norms.reset_index()
    else:
        exploding = None
        skipped["grad_norms"] = "no gradients recorded (probe with --grad)"
    if decay and ck is not None:
        ids = ck.vocab.encode(run.text, unk=run.manifest.get("unk"))
        if ids.shape[1] > max_lag + 60:
            out["grad_decay"] = gradient_decay(ck.model, ids, positions=positions, max_lag=max_lag,
                                               progress=progress)
            out["half_lives"] = half_lives(out["grad_decay"])
        else:
            skipped["grad_decay"] = f"the text is shorter than {max_lag + 60} characters"
    if ablation and ck is not None:
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
    for name, frame in out.items():
        write_table(run, name, frame)
    summary = {"tables": sorted(out), "skipped": skipped, "heldout": heldout, "shifts": shifts,
               "language": src.language, "exploding_steps": exploding}
    write_json(run, "summary", summary)
    out["summary"] = summary
    return out


def top_table(neurons: pd.DataFrame, k: int = 3) -> str:
    """The printed table: the ``k`` strongest units per feature."""
    t = top_units(neurons, k)[["feature", "unit", "metric", "direction", "score", "heldout_score", "q_value"]]
    return t.to_string(index=False, float_format=lambda v: f"{v:.3g}")
