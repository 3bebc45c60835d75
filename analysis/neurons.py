"""Neuron search: which units track which feature, chosen on one part of the text and reported on
another, against a null that keeps the autocorrelation of both series.

Every unit of every state key is scored against every feature: ROC-AUC for binary features,
Pearson (and Spearman) r for continuous ones. The text is split in two. Units are ranked and
selected on the first part (``1 - heldout``) only: by strength there, then by significance there.
The later part is never a sort key; it gives the estimate reported for the selected units (ranking
on it would make it a selected score again, the winner's curse the split exists to avoid).

Significance comes from circular shifts of the feature within each part: shifting keeps each
series' autocorrelation (a unit that drifts slowly and a feature that comes in long runs correlate
by chance far more often than i.i.d. shuffles admit). Every unit gets ``shifts`` streamed shifts per
part (a Student-t prediction interval, see ``nulls.shift_test``); the selected units are re-tested
on the held-out part against every circular shift of it (``nulls.resolved_test``, one FFT each):
the null's spread is then that of all lags rather than of 16 draws, and its exact rank p-value
resolves down to one over the part's length. Benjamini-Hochberg runs over every unit and
feature on the selection part, and over the selected units on the held-out part. Each feature also
gets a control (``controls``): what the current and previous character alone reach on it.

On a Run of words, subwords or several documents (``parts``): only steps with text are scored,
each feature taken at the last character of the step's span; the parts are whole documents when
there are several, and every circular shift stays inside its document. The controls pair tokens
instead of characters.

Everything streams in chunks of rows with sufficient statistics, so a Run is never loaded whole:
pass 1 builds a per-unit histogram of the values; pass 2 turns each value into its mid-rank from the
histogram and accumulates the sums, and the products of values and of ranks with the (shifted) label
columns, which give Pearson r, AUC (Mann-Whitney) and Spearman r. Both passes run over the selection
part of every key first, which alone chooses the units; then over the held-out part, which keeps the
candidates' values as it reads them (``SPARE`` beyond ``select`` per feature), so the resolved test of
the selected units does not read the held-out part a second time. Ranks are taken at 2^-7
relative resolution (values binned on their float16 bit pattern, 8192 bins): values closer than
that tie, and ties are counted half, as in the usual AUC.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rnnscope.store import parse_key
from rnnscope.errors import RnnscopeError

from . import features as feats
from . import kernels, reductions
from .controls import character_controls, token_pair_ids
from .kernels import BINS
from .labels import Labels as _Part, accumulators, assemble, run_block, single_blas
from .nulls import draw_lags, independent_test, null_of, resolved_test, shift_test
from .parts import split_steps
from .source import Source, as_source


# Warn past this held-out resolution: with the 10 units selected per feature of 5 to 10 features, the
# first of 50 to 100 held-out tests reaches q 0.05 only at p <= 5e-4 to 1e-3.
COARSE = 1e-3


class CoarseNull(UserWarning):
    """The held-out null cannot give p-values as small as a claim about one unit needs."""


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """q-values for ``p`` (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m:
        order = np.argsort(p[ok])
        ranked = p[ok][order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(ranked, 1.0)
        q[ok] = out
    return q


def _blocks(a, rows: np.ndarray, chunk: int):
    """``(position in rows, a[rows] of one chunk)`` in order: the chunks of the step range ``rows``
    spans, read whole and narrowed to ``rows`` (steps without text left out)."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    whole = hi - lo == len(rows)
    for s in range(lo, hi, chunk):
        e = min(hi, s + chunk)
        if whole:
            yield s - lo, np.asarray(a[s:e])
            continue
        i0, i1 = np.searchsorted(rows, [s, e])
        if i1 > i0:
            yield int(i0), np.asarray(a[s:e])[rows[i0:i1] - s]


def _histogram(a, rows: np.ndarray, chunk: int) -> np.ndarray:
    """Pass 1 over one part of one key: ``counts [units, BINS]`` of its values' bins."""
    counts = np.zeros((a.shape[1], BINS), np.int32)
    for _, block in _blocks(a, rows, chunk):
        kernels.histogram(kernels.float16_bits(block), counts)
    return counts


def _score_key(a, parts, chunk, keep=None) -> list[dict]:
    """Both passes over one key ``a [steps, units]``; per part (its scored ``rows``): Pearson
    numerators, sums, and rank products, all per unit. ``keep``: units whose values on the (one) part
    are kept as ``kept [rows, len(keep)]`` (in ``a``'s dtype), read in the same pass rather than again."""
    U = a.shape[1]
    out = []
    for rows, part in parts:
        n = len(rows)
        counts = _histogram(a, rows, chunk)
        mid, rank_ss = np.empty((U, BINS), np.float32), np.empty(U)
        kernels.midranks(counts, n, mid, rank_ss)                    # centred mid-ranks per bin
        ref = np.nan_to_num(np.asarray(a[rows[:1024]], np.float64).mean(0))
        s1, s2, bad = np.zeros(U), np.zeros(U), np.zeros(U, bool)
        acc = accumulators(part, U, min(chunk, n))
        kept = []
        with single_blas():
            for p0, raw in _blocks(a, rows, chunk):
                if keep is not None:
                    kept.append(raw[:, keep])
                run_block(raw, p0, part, mid, ref, s1, s2, bad, acc)
        xc, rc = assemble(part, acc, s1)
        mean = ref + s1 / n
        sxx = s2 - s1 * s1 / n
        # a unit with one value on the part (a dead unit, a gate saturated at exactly 1.0) has no score:
        # its sums are exactly zero (every value equals ref), and its r would be 0/0 or float32 dust / 0 = inf
        constant = (s2 == 0) & ~bad
        out.append({"n": n, "sd": np.sqrt(np.maximum(sxx, 0)), "mean": mean, "xc": xc, "rc": rc,
                    "rank_sd": np.sqrt(rank_ss), "bad": bad, "constant": constant,
                    "kept": np.concatenate(kept) if keep is not None else None})
    return out


def _scores(acc: dict, part: _Part, F: pd.DataFrame, name: str, binary: bool) -> np.ndarray:
    """``[units, columns]`` scores of one feature (column 0 observed, the rest shifted)."""
    kind, j = part.slots[name]
    if binary:
        f = F[name].to_numpy()
        n1 = int(f.sum())
        n0 = part.n - n1
        cols = acc["rc"][:, j:j + _width(part, name)]
        rank_sum = cols + n1 * (part.n + 1) / 2            # undo the centring of the ranks
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0) if n1 and n0 else np.full_like(cols, np.nan)
    cols = acc["xc"][:, j:j + _width(part, name)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return cols / acc["sd"][:, None]


def _width(part: _Part, name: str) -> int:
    kind, j = part.slots[name]
    later = [jj for (kk, jj) in part.slots.values() if kk == kind and jj > j]
    total = part.nx if kind == "x" else part.nr
    return (min(later) if later else total) - j


def find_neurons(run, features=None, *, text: str | None = None, language="auto", keys=None,
                 heldout: float = 0.3, shifts: int = 16, select: int = 10, chunk: int = 16384,
                 progress: bool = True, client=None) -> pd.DataFrame:
    """Score every unit of every state key against every feature; select on one part, report on the other.

    ``run``: a ``probe.Run``, a ``source.Source`` or an in-memory trace (with ``text``). ``features``:
    built-in names or a dict name -> ``text -> array[chars]`` (or ``features.on_tokens(fn)``); default:
    the built-ins that suit the text's language. Steps without text are not scored.
    ``select``: how many units per feature are carried to the held-out test. ``client``: a Dask client
    whose workers run both passes over the Run's shards (``analysis.distributed``); the same table.

    Returns one row per (unit, feature), sorted within the table by ``selection_strength`` (then
    ``selection_p``): the order never looks at the held-out part. Columns, by the part they come from:

    - ``unit, key, layer, kind, index, feature, metric`` (``auc`` or ``pearson``), ``direction``;
    - selection part (first ``1 - heldout``): ``selection_score``, ``selection_spearman``,
      ``selection_strength``, ``selection_p`` (two-sided, ``shifts`` circular shifts, t-interval),
      ``selection_q`` (Benjamini-Hochberg over every unit and feature tested), ``selected`` (among the
      first ``select`` of its feature);
    - held-out part: ``heldout_score``, ``heldout_spearman``, ``heldout_strength``, ``heldout_shifts``,
      ``heldout_null_mean``, ``heldout_null_std``, ``heldout_z``, ``heldout_p``, ``heldout_p_empirical``,
      ``heldout_q``. The held-out p is one-sided, in the direction fixed on the selection part. For the
      selected units the null is every circular shift of the held-out part (``heldout_shifts`` = its
      length - 1, one FFT each): ``heldout_p`` is the t-interval against it, ``heldout_p_empirical`` the
      exact rank p-value (floored at 1 / length). Several held-out documents: each is shifted by its
      own lag (``nulls.independent_test``): ``heldout_null_mean`` and ``heldout_null_std`` are exact
      over every combination of lags, ``heldout_p`` is the Gaussian tail against them, and
      ``heldout_p_empirical`` ranks the observed score among ``heldout_shifts`` random combinations
      (floored at 1 / (draws + 1)); the streamed shifts of both parts draw each document's lag the same
      way. With ``nulls.BETWEEN`` (20) or more held-out documents both p-values are the larger of that
      and the between-document sign-flip test's (``nulls.between_test``). ``heldout_q`` is Benjamini-Hochberg over the selected
      units only, the family tested there; NaN for the others, whose ``heldout_p`` comes from the
      ``shifts`` streamed shifts and is a screen, not a claim;
    - controls: ``control_score`` (held-out score of the best function of the current and previous
      character, fitted on the selection part) and ``selectivity`` = held-out score minus it (AUC or r,
      oriented like the unit);
    - kept for older readers: ``score`` = ``selection_score``, ``spearman`` = ``selection_spearman``,
      ``strength`` = ``selection_strength``, ``p_value`` = ``heldout_p``, ``q_value`` = ``heldout_q``.

    A unit constant on a part (a dead unit, a gate saturated at exactly 1.0) has no score there: NaN,
    never ranked or selected, outside both q families.

    ``frame.attrs``: ``units_tested``, ``features_tested``, ``tests`` (the rows with a selection p:
    the ``selection_q`` family), ``selected`` (the ``heldout_q`` family), ``split`` (first held-out step),
    ``shifts``, ``scored_steps`` (steps with text), ``selection_documents`` and ``heldout_documents``
    (names; whole documents to each part when there are several), ``constant_units`` (constant on
    every scored step) and ``constant_on_one_part``, ``selection_null`` and ``heldout_null`` (which
    null each part got), ``heldout_draws`` and ``heldout_resolution`` (the smallest held-out rank
    p-value it can give; past ``COARSE`` a one-line ``CoarseNull`` warning says so).

    A unit's ``direction`` is chosen on the selection part: for AUC, -1 means the unit is *lower*
    inside the feature, and both scores are the AUC of the unit so oriented (so always >= 0.5 on the
    selection part, and below 0.5 held out only if the unit flips). A strength is the effect in that
    direction: ``2 * (AUC - 0.5)`` or ``direction * r``, in [-1, 1].
    """
    src = as_source(run, text, language)
    F, binary = feature_table(src, features if client is None else reductions.worker_features(client, src, features))
    keys = list(dict.fromkeys(keys)) if keys is not None else src.state_keys      # a key named twice: once
    if not keys:
        raise RnnscopeError("nothing to score: the source has no state keys", "record states, not only gradients")
    if select < 1:
        raise RnnscopeError(f"select={select} carries no unit to the held-out test", "use select >= 1")
    sp = split_steps(src, heldout)
    parts = [(rows, _Part(F.iloc[a:b].reset_index(drop=True), binary, shifts, segs))
             for rows, (a, b), segs in zip(sp.parts, [(0, sp.at), (sp.at, len(F))], sp.segments)]
    skipped_features = dict(F.attrs.get("skipped", {}))
    at = sp.at
    frames, constant = [], [0, 0]            # units constant on every scored step, on one part only
    bar = tqdm(total=2 * len(keys), desc="neurons", unit="pass", disable=not progress)
    first = {}
    for key in keys:                         # the selection part of every key: it alone chooses the units
        first[key] = _score_part(src, key, parts[0], chunk, client)
        bar.update()
    want = _candidates(first, parts[0][1], F.iloc[:at], binary, select + SPARE)
    kept = {}
    for key in keys:                         # the held-out part, keeping the candidates' values as it reads
        accs = [first.pop(key), _score_part(src, key, parts[1], chunk, client, want.get(key))]
        kept[key] = (want.get(key), accs[1].pop("kept", None))
        bar.update()
        both = accs[0]["constant"] & accs[1]["constant"]
        constant[0] += int(both.sum())
        constant[1] += int((accs[0]["constant"] | accs[1]["constant"]).sum() - both.sum())
        for name in F.columns:
            frames.append(_feature_rows(key, name, name in binary, accs, parts, F, at))
    bar.close()
    table = pd.concat(frames, ignore_index=True)
    table["selection_q"] = benjamini_hochberg(table["selection_p"].to_numpy())
    table = table.sort_values(["selection_strength", "selection_p"], ascending=[False, True],
                              na_position="last", kind="stable").reset_index(drop=True)
    table["selected"] = table.groupby("feature", sort=False).cumcount() < select
    table.loc[table["selection_strength"].isna(), "selected"] = False
    _resolve_selected(table, src, F, binary, sp, chunk, kept)
    table = table.merge(_controls(src, F, binary, sp), on="feature", how="left")
    oriented = np.where(table["metric"] == "auc", table["heldout_score"], table["heldout_strength"])
    table["selectivity"] = oriented - table["control_score"]
    table = table.assign(score=table["selection_score"], spearman=table["selection_spearman"],
                         strength=table["selection_strength"], p_value=table["heldout_p"],
                         q_value=table["heldout_q"])
    table.attrs.update(units_tested=int(sum(src.arrays[k].shape[1] for k in keys)), features_tested=F.shape[1],
                       tests=int(table["selection_p"].notna().sum()), selected=int(table["selected"].sum()), split=sp.step, shifts=shifts,
                       scored_steps=len(sp.rows), selection_documents=sp.documents[0],
                       heldout_documents=sp.documents[1], constant_units=constant[0],
                       constant_on_one_part=constant[1], **_nulls_said(sp, shifts))
    table.attrs["skipped_features"] = skipped_features
    return table


# candidates kept per feature beyond ``select``: a unit that is NaN or Inf on the held-out part drops out
# of the selection there, and the next one moves up (more than SPARE such units: that key is read again)
SPARE = 5


def _score_part(src, key, part, chunk, client, keep=None) -> dict:
    """``_score_key`` of one part of one key, in this process or on ``client``'s workers (which keep nothing)."""
    a = src.array(key)
    if client is None:
        return _score_key(a, [part], chunk, keep)[0]
    from .distributed import score_key
    return {**score_key(client, a, [part], chunk)[0], "kept": None}


def _selection(acc: dict, part: "_Part", F: pd.DataFrame, name: str, is_bin: bool, nonfinite) -> tuple:
    """A feature's selection-part scores of one key ``[units, 1 + shifts]`` (NaN where ``nonfinite`` or
    constant), oriented on the observed column: ``(scores, direction, strength)``."""
    sel = _scores(acc, part, F, name, is_bin)
    sel[nonfinite | acc["constant"]] = np.nan
    if is_bin:   # orient each unit on the selection part: AUC 0.02 is a unit that is off inside
        direction = np.where(sel[:, 0] < 0.5, -1, 1)
        sel = np.where((direction < 0)[:, None], 1 - sel, sel)
        return sel, direction, 2 * (sel[:, 0] - 0.5)
    direction = np.where(sel[:, 0] < 0, -1, 1)
    return sel, direction, direction * sel[:, 0]


def _candidates(first: dict, part: "_Part", F: pd.DataFrame, binary: list[str], k: int) -> dict:
    """``{key: unit indexes}``: per feature the first ``k`` units in the table's own order (selection
    strength, then selection p, then key and unit), from the selection part alone."""
    rows = []
    for key, acc in first.items():
        for name in F.columns:
            sel, direction, strength = _selection(acc, part, F, name, name in binary, acc["bad"])
            p = shift_test(sel if name in binary else direction[:, None] * sel, two_sided=True)["p"]
            rows.append((name, key, strength, p))
    want: dict = {}
    for name in F.columns:
        mine = [(key, st, p) for n, key, st, p in rows if n == name]
        strength = np.concatenate([st for _, st, _ in mine])
        p = np.concatenate([pp for _, _, pp in mine])
        where = np.concatenate([np.full(len(st), i) for i, (_, st, _) in enumerate(mine)])
        unit = np.concatenate([np.arange(len(st)) for _, st, _ in mine])
        ok = np.isfinite(strength)
        order = np.lexsort((np.arange(len(p)), np.where(np.isnan(p), np.inf, p), -np.where(ok, strength, -np.inf)))
        for i in order[ok[order]][:k]:
            want.setdefault(mine[where[i]][0], set()).add(int(unit[i]))
    return {key: np.array(sorted(v), np.int64) for key, v in want.items()}


def _controls(src, F: pd.DataFrame, binary: list[str], sp) -> pd.DataFrame:
    """Each feature's control scores (``controls.character_controls``): what the current and previous
    character (or token) alone reach on it. A Run of frames has neither, so no control: NaN, and so is
    every ``selectivity`` (a pair of empty tokens would be a constant predictor, scored as if it were one)."""
    if src.frames:
        return pd.DataFrame({"feature": list(F.columns), "control_selection_score": np.nan, "control_score": np.nan})
    tokens = None if src.char_level else src.tokens()
    ids = None if src.char_level else token_pair_ids([tokens[i] for i in sp.rows], src.step_document[sp.rows])
    return character_controls(src.text, F, binary, sp.at, ids)


def _nulls_said(sp, shifts: int) -> dict:
    """Which null each part got and the held-out one's resolution (attrs); a one-line warning when
    that resolution is too coarse to single out a unit."""
    sel, held = null_of(sp.segments[0]), null_of(sp.segments[1])
    if held["resolution"] > COARSE:
        docs = len(sp.segments[1])
        what = (f"every circular shift of one held-out document of {sp.segments[1][0]} steps" if docs == 1
                else f"{held['draws']} draws of shifts of {docs} held-out documents")
        warnings.warn(f"held-out p-values of this table cannot go below {held['resolution']:.2g} ({what}); "
                      "hold out more or longer documents", CoarseNull, stacklevel=3)
    return {"selection_null": f"{shifts} draws of {sel['null']}", "heldout_null": held["null"],
            "heldout_draws": held["draws"], "heldout_resolution": held["resolution"]}


def _feature_rows(key, name, is_bin, accs, parts, F, split) -> pd.DataFrame:
    """One key's rows for one feature: scores on both parts, oriented on the selection part, each
    with its streamed shift test. A unit NaN or Inf anywhere scores NaN on both parts; a unit
    constant on a part scores NaN there (so, constant on the selection part, it is never ranked)."""
    nonfinite = accs[0]["bad"] | accs[1]["bad"]
    sel, direction, sel_strength = _selection(accs[0], parts[0][1], F.iloc[:split], name, is_bin, nonfinite)
    held = _scores(accs[1], parts[1][1], F.iloc[split:], name, is_bin)
    held[nonfinite | accs[1]["constant"]] = np.nan
    if is_bin:
        held = np.where((direction < 0)[:, None], 1 - held, held)
        held_strength = 2 * (held[:, 0] - 0.5)
        sp = hsp = np.full(len(sel), np.nan)
    else:
        held_strength = direction * held[:, 0]
        sp, hsp = (np.where(nonfinite | acc["constant"], np.nan, _spearman(acc, part, name))
                   for acc, (_, part) in zip(accs, parts))
    oriented = (lambda m: m) if is_bin else (lambda m: direction[:, None] * m)
    st = shift_test(oriented(sel), two_sided=True)
    ht = shift_test(oriented(held), two_sided=False)
    U = len(sel)
    info = parse_key(key)
    return pd.DataFrame({
        "unit": [f"{key}:{i}" for i in range(U)], "key": key, "layer": info["layer"], "kind": info["kind"],
        "index": np.arange(U), "feature": name, "metric": "auc" if is_bin else "pearson", "direction": direction,
        "selection_score": sel[:, 0], "selection_spearman": sp, "selection_strength": sel_strength,
        "selection_p": st["p"], "heldout_score": held[:, 0], "heldout_spearman": hsp,
        "heldout_strength": held_strength, "heldout_shifts": float(held.shape[1] - 1),
        "heldout_null_mean": np.where(is_bin, ht["null_mean"], direction * ht["null_mean"]),
        "heldout_null_std": ht["null_std"], "heldout_z": ht["z"], "heldout_p": ht["p"],
        "heldout_p_empirical": ht["p_empirical"], "heldout_q": np.nan})


def _resolve_selected(table: pd.DataFrame, src, F: pd.DataFrame, binary: list[str], sp, chunk: int,
                      kept: dict | None = None) -> None:
    """Re-test the selected rows on the held-out part (in place), reading only those units' columns,
    and give them their q-values: against every circular shift of one held-out document, or against
    independent shifts of each of several (``nulls``)."""
    cols = ["heldout_shifts", "heldout_null_mean", "heldout_null_std", "heldout_z", "heldout_p", "heldout_p_empirical"]
    sel = table.index[table["selected"]]
    segs = sp.segments[1]
    if len(segs) > 1:
        lags = draw_lags(segs, null_of(segs)["draws"])
        test = lambda x, f, b, d: independent_test(x, f, b, d, segs, lags)        # noqa: E731
    else:
        test = lambda x, f, b, d: resolved_test(x, f, b, d, segs)                 # noqa: E731
    found = {}
    for key, rows in table.loc[sel].groupby("key", sort=False):
        a = src.arrays[key]
        idx = np.unique(rows["index"].to_numpy())
        have, values = (kept or {}).get(key, (None, None))
        if values is not None and np.isin(idx, have).all():       # read with the held-out pass
            idx, x = have, values.astype(np.float32)
        else:
            x = np.concatenate([b[:, idx] for _, b in _blocks(a, sp.parts[1], chunk)]).astype(np.float32)
        col = {u: j for j, u in enumerate(idx)}
        for i, unit, name, d in zip(rows.index, rows["index"], rows["feature"], rows["direction"]):
            r = test(x[:, col[unit]], F[name].to_numpy(np.float64)[sp.at:], name in binary, int(d))
            mean = r["null_mean"] if name in binary else d * r["null_mean"]      # as heldout_score is
            found[i] = [r["shifts"], mean, r["null_std"], r["z"], r["p"], r["p_empirical"]]
    if found:
        table.loc[list(found), cols] = np.array(list(found.values()), np.float64)
    table["heldout_shifts"] = table["heldout_shifts"].astype(np.int64)
    table.loc[sel, "heldout_q"] = benjamini_hochberg(table.loc[sel, "heldout_p"].to_numpy())


def _spearman(acc: dict, part: _Part, name: str) -> np.ndarray:
    _, j = part.slots[name + "\0rank"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return acc["rc"][:, j] / acc["rank_sd"]


def feature_table(src: Source, features) -> tuple[pd.DataFrame, list[str]]:
    """``[scored steps x features]`` (indexed by step; steps without text left out) and the names of
    the binary ones. A feature constant on the scored steps is left out (no unit can be scored against
    it), with a ``FeatureSkipped`` warning; ``F.attrs["skipped"]`` says why, feature by feature."""
    features = chosen_features(src, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = feats.steps(src, features, src.language or "c")
    F = F[src.scored]
    keep, skipped = [], {}
    for name in F.columns:
        col = F[name].to_numpy(np.float64)
        if not np.isfinite(col).all():
            raise RnnscopeError(f"feature {name!r} has NaN or Inf values", "features must be finite numbers")
        if col.min() == col.max():
            skipped[name] = f"constant on the scored steps ({col[0]:g})"
            warnings.warn(f"feature {name!r} is {skipped[name]}; skipped", feats.FeatureSkipped, stacklevel=3)
        else:
            keep.append(name)
    if not keep:
        raise RnnscopeError("every feature is constant on this text", "use a longer or more varied text")
    F = F[keep].astype(np.float64)
    F.attrs["skipped"] = skipped
    binary = [c for c in keep if set(np.unique(F[c])) <= {0.0, 1.0}]
    return F, binary


def chosen_features(src: Source, features):
    """``features``, or the built-ins that suit ``src`` when None (``source.default_features``). A frames
    source has no text, so only features given per step (arrays ``[steps]``) suit it."""
    if src.frames:
        by_text = [k for k, f in features.items() if callable(f) or isinstance(f, (str, feats.on_tokens))] \
            if isinstance(features, Mapping) else list(features or ["built-in"])
        if by_text:
            raise RnnscopeError(f"{by_text[0]!r} features are computed on text, and this Run's steps are frames "
                                "without text", "pass features={name: array of one number per step}")
    if features is not None:
        return features
    return src.defaults if src.defaults is not None else feats.defaults_for(src.language)


default_features = feats.defaults_for          # (the benchmarks import it by this name)


def top_units(table: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """The ``k`` strongest units per feature, ranked on the selection part only (strength, then p)."""
    top = table.dropna(subset=["selection_strength"]).sort_values(
        ["selection_strength", "selection_p"], ascending=[False, True], kind="stable")
    top = top.groupby("feature", sort=False).head(k)
    order = {f: i for i, f in enumerate(top["feature"].unique())}
    return top.sort_values("feature", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
