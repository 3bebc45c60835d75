"""Neuron search over a long Run: 1,000,000 steps x 3,072 units x 10 features (issue 4: < 60 s on
the 2-core CI machine; issue 23: at most 3x one plain read of every value).

The states are synthetic (tanh of AR(1) noise, float16 .npy files memory-mapped exactly as a Run's
are); the text is real C (zoo/samples/linux.c repeated), so the ten feature tracks come from the
real lexer and are part of the time. Printed beside it, measured in the same run:
  - one plain read of every value (np.sum over the memory-mapped chunks): the floor of any streaming pass;
  - the naive way, scipy per unit (rankdata + AUC, pearsonr, spearmanr, on both parts), timed on
    a few units and scaled to all of them.
After a warm-up (the kernels compiled, the states in the page cache, one read and one search on a
slice), the read and the search are interleaved ``--repeat`` times, so that both see the same load
on a shared machine; the ratio printed is of the minima, the medians beside it. Each search lexes
the text afresh, as ``analyze`` does (the lexer's cache would hand later rounds their tokens).

    python benchmarks/neuron_search.py [--steps 1000000] [--units 3072] [--repeat 3] [--dir /tmp/nsbench] [--profile]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import signal, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnnscope.analysis import features, find_neurons  # noqa: E402
from rnnscope.analysis.neurons import default_features  # noqa: E402


TARGET = 3.0        # issue 23: the search at most this many plain reads of the Run's states


def make_states(root: Path, steps: int, units: int, per_key: int = 512) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for k in range(units // per_key):
        path = root / f"k{k}.npy"
        a = np.lib.format.open_memmap(path, "w+", np.float16, (steps, per_key))
        zi = np.zeros((1, per_key))
        for s in range(0, steps, 65536):
            e = min(steps, s + 65536)
            noise = rng.standard_normal((e - s, per_key), np.float32)
            block, zi = signal.lfilter([1.0], [1.0, -0.9], noise, axis=0, zi=zi)   # AR(1) along time
            a[s:e] = np.tanh(block / 2)
        a.flush()
        del a
        arrays[f"rnn.l{k // 6}.{'hcifgo'[k % 6]}"] = np.load(path, mmap_mode="r")
    return arrays


def reuse(root: Path, steps: int, units: int, per_key: int = 512) -> dict | None:
    """The states ``make_states`` wrote to ``root`` before, if they are all there with these shapes."""
    arrays = {}
    for k in range(units // per_key):
        path = root / f"k{k}.npy"
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if a.shape != (steps, per_key) or a.dtype != np.float16:
            return None
        arrays[f"rnn.l{k // 6}.{'hcifgo'[k % 6]}"] = a
    return arrays


def read(arrays: dict) -> float:
    """One plain read of every value: what any streaming pass over the Run pays at least."""
    total = 0.0
    for a in arrays.values():
        for s in range(0, len(a), 65536):
            total += float(np.asarray(a[s:s + 65536], np.float32).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--units", type=int, default=3072)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of read and search")
    ap.add_argument("--profile", action="store_true", help="then one more search under cProfile: where its time goes")
    ap.add_argument("--dir", help="where to write the states, kept for the next run, which reads them "
                    "(default: a temporary directory, removed)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="nsbench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        base = Path(__file__).resolve().parents[1].joinpath("zoo/samples/linux.c").read_text()
        text = (base * (args.steps // len(base) + 1))[: args.steps]
        t0 = time.perf_counter()
        arrays = reuse(root, args.steps, args.units) if args.dir else None
        if arrays is None:
            arrays = make_states(root, args.steps, args.units)
            print(f"wrote {args.units} units x {args.steps:,} steps of float16 in {time.perf_counter() - t0:.0f} s")
        else:
            print(f"read the states {args.dir} holds from an earlier run (the same --steps and --units)")
        names = default_features("c")
        read(arrays)                                                   # warm-up: page cache, kernels
        find_neurons({k: a[:20000] for k, a in arrays.items()}, names, text=text[:20000], progress=False)
        reads, searches = [], []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            read(arrays)
            reads.append(time.perf_counter() - t0)
            features.clear_cache()                                     # each search lexes the text, as a first one does
            t0 = time.perf_counter()
            table = find_neurons(arrays, names, text=text, progress=False)
            searches.append(time.perf_counter() - t0)
        read_min, search_min = min(reads), min(searches)
        read_med, search_med = float(np.median(reads)), float(np.median(searches))
        if args.profile:
            import cProfile
            import pstats
            features.clear_cache()
            with cProfile.Profile() as prof:
                find_neurons(arrays, names, text=text, progress=False)
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        F = features.compute(text, names)
        split = int(round(args.steps * 0.7))
        a = next(iter(arrays.values()))
        few = 4
        t0 = time.perf_counter()
        for u in range(few):
            x = np.asarray(a[:, u], np.float64)
            for name in names:
                f = F[name].to_numpy()
                for lo, hi in ((0, split), (split, args.steps)):
                    if set(np.unique(f)) <= {0, 1}:
                        r = stats.rankdata(x[lo:hi])
                        _ = r[f[lo:hi] == 1].sum()
                    else:
                        stats.pearsonr(x[lo:hi], f[lo:hi])
                        stats.spearmanr(x[lo:hi], f[lo:hi])
        naive = (time.perf_counter() - t0) / few * args.units
        print(f"\nneuron search: {args.steps:,} steps x {args.units:,} units x {len(names)} features "
              f"({table.feature.nunique()} non-constant on this text: {len(table):,} unit-feature pairs, "
              f"16 shifted nulls on each part, the {table.attrs['selected']} selected re-tested against every shift)")
        print(f"{len(reads)} interleaved rounds after a warm-up; ratio = min / min of the plain read")
        print(f"{'':32s}{'min s':>9s}{'median s':>10s}{'ratio':>8s}{'median ratio':>14s}")
        print(f"{'one plain read of every value':32s}{read_min:9.1f}{read_med:10.1f}{1.0:8.2f}{1.0:14.2f}")
        print(f"{'find_neurons (target <= 3x)':32s}{search_min:9.1f}{search_med:10.1f}"
              f"{search_min / read_min:8.2f}{search_med / read_med:14.2f}")
        print(f"{'naive scipy per unit (scaled)':32s}{naive:9.1f}{'':10s}{naive / read_min:8.2f}   (no null, no shifts)")
        search = search_min
        print(f"find_neurons is {naive / search:.0f}x faster than the naive loop")
        ratio, ratio_med = search_min / read_min, search_med / read_med
        verdict = "meets" if max(ratio, ratio_med) <= TARGET else "misses"
        print(f"target (issue 23): find_neurons <= {TARGET:g}x one plain read; it is {ratio:.2f}x (min), "
              f"{ratio_med:.2f}x (median): {ratio / TARGET:.2f}x and {ratio_med / TARGET:.2f}x the target, {verdict} it")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
