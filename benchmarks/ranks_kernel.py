"""The neuron search's second-pass kernel (``kernels.ranks_and_sums``) of this checkout against the
same kernel at an older revision: interleaved rounds over the same label blocks, min and median
nanoseconds a value a thread, and a check that every sum and product is equal to the bit.

The states are the neuron-search benchmark's (tanh of AR(1) noise, float16), ``--rows`` x ``--units``
in memory; the labels are the real feature columns of C text (zoo/samples/linux.c repeated). The old
kernel is ``--rev``'s ``analysis/kernels.py`` taken from git into a temporary folder (it needs only
numpy and numba), called by this checkout's ``labels.run_block`` with its label blocks, whose layout
and call it shares.

    python benchmarks/ranks_kernel.py [--rev 3783381] [--rows 200000] [--units 512] [--rounds 7]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from neuron_search import make_states  # noqa: E402

from rnnscope.analysis import features, kernels, labels  # noqa: E402
from rnnscope.analysis.neurons import default_features  # noqa: E402


def old_kernels(rev: str, where: Path):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:analysis/kernels.py"], check=True,
                         capture_output=True, text=True).stdout
    path = where / "old_kernels.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="3783381", help="the older revision (default: before the kernel's rewrite)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=16384)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:          # the benchmark's states, one key of --units
        a = np.array(next(iter(make_states(Path(tmp), args.rows, args.units, per_key=args.units).values())))
    base = (ROOT / "zoo/samples/linux.c").read_text()
    text = (base * (args.rows // len(base) + 1))[:args.rows]
    F = features.compute(text, default_features("c"))
    binary = [c for c in F.columns if set(np.unique(F[c])) <= {0, 1}]
    part = labels.Labels(F, binary, 16)
    U, R = args.units, args.rows
    counts = np.zeros((U, kernels.BINS), np.int32)
    for s in range(0, R, args.chunk):
        kernels.histogram(kernels.float16_bits(a[s:s + args.chunk]), counts)
    mid, rank_ss = np.empty((U, kernels.BINS), np.float32), np.empty(U)
    kernels.midranks(counts, R, mid, rank_ss)
    ref = np.asarray(a[:1024], np.float64).mean(0)
    blocks = [(s, a[s:s + args.chunk], part.block(s, min(R, s + args.chunk))) for s in range(0, R, args.chunk)]

    def run(K) -> tuple[float, dict]:
        """The chunks through ``labels.run_block`` (the search's own call) with ``K``'s kernel."""
        s1, s2, bad = np.zeros(U), np.zeros(U), np.zeros(U, bool)
        acc = labels.accumulators(part, U, args.chunk)
        labels.kernels = K
        try:
            t0 = time.perf_counter()
            with labels.single_blas():
                for p0, raw, b in blocks:
                    labels.run_block(raw, p0, part, mid, ref, s1, s2, bad, acc, share=b)
            took = time.perf_counter() - t0
        finally:
            labels.kernels = kernels
        return took, {"s1": s1, "s2": s2, "bad": bad, "x1": acc["x1"], "x2": acc["x2"], "r1": acc["r1"]}

    with tempfile.TemporaryDirectory() as tmp:
        sides = {f"kernel at {args.rev}": old_kernels(args.rev, Path(tmp)), "this checkout's kernel": kernels}
        outs = {name: run(K)[1] for name, K in sides.items()}          # warm-up: compiled, pages touched
        times = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in list(sides)[r % 2:] + list(sides)[:r % 2]:
                times[name].append(run(sides[name])[0])
    threads = numba.get_num_threads()
    per = R * U / threads * 1e-9          # seconds -> ns a value a thread
    first, this = outs.values()
    equal = all(np.array_equal(first[k], this[k]) for k in first)
    print(f"{R:,} rows x {U} units, {threads} threads, {args.rounds} interleaved rounds; label changes per "
          f"{args.chunk}-row block: {len(blocks[0][2][0])} x1, {len(blocks[0][2][4])} x2, {len(blocks[0][2][8])} r1")
    old_min = min(times[f"kernel at {args.rev}"])
    for name, t in times.items():
        print(f"  {name:28s} min {min(t) / per:6.2f}  median {np.median(t) / per:6.2f} ns a value a thread"
              f"  ({old_min / min(t):.2f}x the old kernel's speed at the minimum)")
    print("every sum and product equal to the bit" if equal else "DIFFERENT results: " + ", ".join(
        f"{k} {np.abs(first[k].astype(float) - this[k].astype(float)).max():.3g}" for k in first))
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
