"""The whole-Run reads other than the neuron search as Dask reductions over a sharded Run's shards:
one task per shard file, opened by path on the worker (``distributed._files``), its small result
reduced on the client.

- ``extremes``: each shard's top-k and bottom-k steps per unit with their values; the client keeps
  the k best of the union under the single-process order (value, then the earlier step), so the
  steps are exactly those of ``contexts._extremes``.
- ``saturation``: each shard's counts below / above the thresholds (integers: exact) and its float64
  sum (equal to one process's up to the order of the additions).
- ``grad_norms``: each shard's per-step norms (computed row by row: exact), concatenated.
- ``worker_features``: each shard's feature tracks from its own text and spans (a shard is whole
  documents and the tracks are per character within a document: the same numbers), concatenated.

Each function returns None when ``a`` is not a Run's memory-mapped array (an in-memory trace); the
caller then computes in this process.
"""
from __future__ import annotations

import warnings

import numpy as np


def _files(a):
    from .distributed import _files        # imported when a client is given: the numba kernels load only then
    return _files(a)


def _shards(client, a, fn, *args) -> list | None:
    """``fn(path, lo, hi, *args)`` for each file of ``a`` (its rows ``[lo, hi)``) on ``client``'s
    workers, in step order; None for an array that is not a Run's."""
    found = _files(a)
    if found is None:
        return None
    files, bounds = found
    futures = [client.submit(fn, f, int(lo), int(hi), *args, pure=False)
               for f, lo, hi in zip(files, bounds[:-1], bounds[1:]) if hi > lo]
    return client.gather(futures)


def _open(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _shard_extremes(path, lo, hi, k, chunk, has_text):
    """A shard's ``{side: (values [k', units], steps [k', units])}`` (``k' = min(k, rows)``, steps in Run
    numbering) with ``contexts._extreme_sets``."""
    from .contexts import _extreme_sets
    sets = _extreme_sets(_open(path), min(k, hi - lo), chunk, has_text)
    return {side: (v, s + lo) for side, (v, s) in sets.items()}


def extremes(client, a, k: int, chunk: int, has_text: np.ndarray) -> dict[str, np.ndarray] | None:
    """``contexts._extremes(a, k, chunk, has_text)`` with one task per shard: ``{side: steps [k, units]}``,
    strongest first."""
    found = _files(a)
    if found is None:
        return None
    files, b = found
    got = client.gather([client.submit(_shard_extremes, f, int(lo), int(hi), k, chunk, has_text[lo:hi], pure=False)
                         for f, lo, hi in zip(files, b[:-1], b[1:]) if hi > lo])
    out = {}
    for side in ("top", "bottom"):
        v = np.concatenate([g[side][0] for g in got])                  # [shards * k', units]
        s = np.concatenate([g[side][1] for g in got])
        order = np.lexsort((s, -v), axis=0)[:k]                        # value first, then earliest step
        out[side] = np.take_along_axis(s, order, 0)
    return out


def _shard_saturation(path, lo, hi, low, high, chunk):
    """A shard's ``left, right`` counts (int64) and float64 ``total`` per unit (``gates._counts``)."""
    from .gates import _counts
    return _counts(_open(path), low, high, chunk)


def saturation(client, a, low: float, high: float, chunk: int):
    """``(left, right, total)`` per unit over the whole key: the shards' counts and sums added."""
    got = _shards(client, a, _shard_saturation, low, high, chunk)
    if got is None:
        return None
    return tuple(sum(g[i] for g in got) for i in range(3))


def _shard_norms(path, lo, hi, chunk):
    from .gradflow import _norms
    return _norms(_open(path), chunk)


def grad_norms(client, a, chunk: int) -> np.ndarray | None:
    """``gradflow._norms(a, chunk)``: ``[steps]``, the shards' per-step norms in step order."""
    got = _shards(client, a, _shard_norms, chunk)
    return None if got is None else np.concatenate(got)


def _shard_steps(path, by_char, language):
    """A shard's ``features.steps`` frame ``[shard steps x features]``, from its own text and spans."""
    from rnnscope.store import open_run
    from .features import steps
    from .source import as_source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # as feature_table: a feature constant on one document is no news
        return steps(as_source(open_run(path), language=language), by_char, language)


def shard_steps(client, src, features, language: str) -> dict[str, np.ndarray] | None:
    """``features.steps(src, features, language)`` for the per-character features (names, or a dict's
    functions ``text -> array[chars]``) of a sharded Run's ``src``, one task per shard: ``name -> [steps]``;
    None when ``src`` is not a sharded Run's or asks no per-character feature."""
    from rnnscope.store.shards import ShardedRun
    if not isinstance(getattr(src, "run", None), ShardedRun):
        return None
    named = isinstance(features, dict)
    by_char = {k: f for k, f in features.items() if callable(f) or isinstance(f, str)} if named else list(features)
    if not by_char:
        return None
    got = client.gather([client.submit(_shard_steps, str(s.path), by_char, language, pure=False)
                         for s in src.run.shards])
    return {k: np.concatenate([g[k].to_numpy() for g in got]) for k in by_char}


def worker_features(client, src, features) -> dict | list | None:
    """``features`` for ``neurons.feature_table`` with the per-character ones computed on ``client``'s
    workers, shard by shard: each becomes an ``on_tokens`` feature returning its column (steps without
    text already NaN); ``features`` unchanged when ``src`` is not a sharded Run's."""
    from .features import on_tokens
    from .neurons import chosen_features
    features = chosen_features(src, features)
    cols = shard_steps(client, src, features, src.language or "c")
    if cols is None:
        return features
    items = features.items() if isinstance(features, dict) else ((k, None) for k in features)
    return {k: on_tokens(lambda _, c=cols[k]: c) if k in cols else f for k, f in items}
