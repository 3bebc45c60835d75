"""Recording and the neuron search in one process, on a Dask cluster of 1 worker and of 2 workers.

    python benchmarks/scale.py [--chars 200000] [--docs 64] [--workers 1,2] [--spec zoo:lstm-linux]

The same corpus (the shipped C sample repeated to ``--chars`` and cut into ``--docs`` documents)
is recorded and searched (``find_neurons``) in this process and on a ``LocalCluster`` of N worker
processes (one thread each) on 127.0.0.1; every run in the same invocation, one thread per process,
so the ratios compare like with like. Printed per setting: seconds, steps per second, and the ratio
to one process (the engine's overhead is 1 worker's time over one process's; the speed-up is one
process's time over N workers'). Starting the cluster is timed apart. Each sharded Run is checked
equal to the single-process one before its numbers are printed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _corpus(chars: int, docs: int) -> dict[str, str]:
    from rnnscope import zoo
    base = (zoo.SAMPLES / "linux.c").read_text()
    text = (base * (chars // len(base) + 1))[:chars]
    cut = np.linspace(0, chars, docs + 1).astype(int)
    return {f"doc{i:04d}.c": text[a:b] for i, (a, b) in enumerate(zip(cut[:-1], cut[1:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--spec", default="zoo:lstm-linux")
    ap.add_argument("--kinds", default="h,c")
    args = ap.parse_args()
    import torch
    from distributed import Client, LocalCluster

    import rnnscope as rs
    from rnnscope.analysis.neurons import find_neurons
    torch.set_num_threads(1)
    docs, kinds, subject = _corpus(args.chars, args.docs), args.kinds.split(","), rs.load(args.spec)
    feats = ["in_string", "in_comment", "column", "paren_depth"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        one = rs.record(subject, docs, Path(tmp, "one"), kinds=kinds, progress=False)
        rec = time.perf_counter() - t
        t = time.perf_counter()
        ref = find_neurons(one, feats, language="c", progress=False)
        ana = time.perf_counter() - t
        rows.append(("one process", 0.0, rec, ana))
        for n in map(int, args.workers.split(",")):
            t = time.perf_counter()
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.run(lambda: __import__("torch") and None)      # the workers' imports are start-up, not work
                start = time.perf_counter() - t
                t = time.perf_counter()
                many = rs.record(subject, docs, Path(tmp, f"many{n}"), kinds=kinds, progress=False, client=client,
                                 shard_docs=max(1, args.docs // (4 * n)))
                r = time.perf_counter() - t
                t = time.perf_counter()
                got = find_neurons(many, feats, language="c", progress=False, client=client)
                a = time.perf_counter() - t
            for k in one.keys():
                assert np.asarray(one[k]).tobytes() == np.asarray(many[k]).tobytes(), k
            assert (got[["unit", "feature"]].to_numpy() == ref[["unit", "feature"]].to_numpy()).all()
            rows.append((f"{n} worker{'s' if n > 1 else ''}", start, r, a))
    steps = len(one)
    print(f"{args.spec}, {steps:,} steps in {args.docs} documents, kinds {args.kinds}; one thread per process")
    print(f"{'':<12} {'start s':>8} {'record s':>9} {'steps/s':>9} {'x one':>6} {'search s':>9} {'steps/s':>9} "
          f"{'x one':>6}")
    for name, start, r, a in rows:
        print(f"{name:<12} {start:8.1f} {r:9.2f} {steps / r:9,.0f} {rows[0][2] / r:6.2f} {a:9.2f} "
              f"{steps / a:9,.0f} {rows[0][3] / a:6.2f}")


if __name__ == "__main__":
    main()
