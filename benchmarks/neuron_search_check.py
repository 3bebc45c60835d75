"""Is the neuron table the same as an older version's? Runs ``find_neurons`` of this checkout and of
``--rev`` (default: where this branch left ``main``, the merge base, whose other packages are
this checkout's; its ``analysis/`` package taken from git into a temporary folder, so
nothing of it is kept here) on the benchmark's data, in the same process and with the same thread
counts, and compares every column: scores to 1e-9 absolute, p- and q-values to 1e-9 relative,
everything else exactly, row by row after sorting both by (unit, feature).

Run both under the same BLAS thread count: the float32 products with the feature columns round
differently when OpenBLAS splits them differently (1 thread against 2 moved scores by 1e-8 and p by
1e-6 on main's own code), which is a property of the old code, not of the change.

``--base DIR`` takes the analysis package of another checkout instead (read in place, e.g. a clean
copy of main); ``--float64`` runs the base's products with the feature columns in float64, the
reference an exact reformulation of them must match (the float32 ones are ~5e-8 off in a score).

    python benchmarks/neuron_search_check.py [--steps 200000] [--units 1024] [--rev REV | --base DIR] [--float64]
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from neuron_search import make_states  # noqa: E402
from rnnscope.analysis import find_neurons  # noqa: E402
from rnnscope.analysis.neurons import default_features  # noqa: E402

SCORES = ("score", "spearman", "strength", "null_mean", "null_std", "selectivity", "control")
RELATIVE = ("_p", "_q", "p_value", "q_value", "_z", "p_empirical")


# The old products with the feature columns, in float64 instead of float32: the same formulas without
# float32 rounding (its columns rounded to float32 and its sums accumulated in float32 moved scores by
# ~1e-8, more than the tolerance; the values and mid-ranks it multiplies are exact in float32). Written
# for the label blocks of main before the sparse columns (c50d530 and earlier, back to 4309b3c).
FLOAT64 = [("self.X = np.empty((self.n, sum(x for x, _ in wide)), np.float32)",
            "self.X = np.empty((self.n, sum(x for x, _ in wide)), np.float64)"),
           ("self.R = np.empty((self.n, sum(r for _, r in wide)), np.float32)",
            "self.R = np.empty((self.n, sum(r for _, r in wide)), np.float64)")]


def old_search(rev: str, where: Path, base: Path | None = None, float64: bool = False, tag: str = "old"):
    """``find_neurons`` of ``rev``'s analysis package (or of the checkout at ``base``, only read),
    importable as ``{tag}_analysis``; ``float64``: its feature products in float64 (``FLOAT64``)."""
    pkg = where / f"{tag}_analysis"
    pkg.mkdir()
    if base is not None:
        sources = {p.name: p.read_text() for p in sorted((base / "analysis").glob("*.py"))}
    else:
        names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "analysis/"],
                               check=True, capture_output=True, text=True).stdout.split()
        sources = {Path(name).name: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True,
                                                   capture_output=True, text=True).stdout
                   for name in names if name.endswith(".py")}
    for name, src in sources.items():
        if name == "__init__.py":        # its __init__ refuses other names
            continue
        if float64 and name == "neurons.py":
            for old, new in FLOAT64:
                if old not in src:
                    raise SystemExit(f"--float64: {name} has no {old!r} to change")
                src = src.replace(old, new)
        (pkg / name).write_text(src)
    (pkg / "__init__.py").write_text("")
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    return importlib.import_module(f"{tag}_analysis.neurons").find_neurons


def compare(old, new) -> list[str]:
    """Every column that differs beyond its tolerance, with the largest difference."""
    key = ["unit", "feature"]
    old, new = old.sort_values(key).reset_index(drop=True), new.sort_values(key).reset_index(drop=True)
    bad = [] if list(old.columns) == list(new.columns) else [f"columns {list(old.columns)} != {list(new.columns)}"]
    for c in old.columns:
        if c not in new:
            continue
        a, b = old[c].to_numpy(), new[c].to_numpy()
        if a.dtype.kind not in "fiub":
            if not (a == b).all():
                bad.append(f"{c}: {int((a != b).sum())} values differ")
            continue
        a, b = a.astype(float), b.astype(float)
        same_nan = np.isnan(a) == np.isnan(b)
        ok = np.isfinite(a) & np.isfinite(b)
        if any(c.endswith(r) for r in RELATIVE):
            diff = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-300)
        elif any(s in c for s in SCORES):
            diff = np.abs(a[ok] - b[ok])
        else:
            diff = np.abs(a[ok] - b[ok]) * 1e9           # exact
        inf_same = (a[~ok & ~np.isnan(a)] == b[~ok & ~np.isnan(a)]).all()
        worst = float(diff.max()) if diff.size else 0.0
        if not same_nan.all() or worst > 1e-9 or not inf_same:
            bad.append(f"{c}: max difference {worst:.3g}, NaN where the other is not: {int((~same_nan).sum())}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=1024)
    ap.add_argument("--rev", help="default: git merge-base HEAD main")
    ap.add_argument("--base", type=Path, help="compare with the analysis package of this checkout (only read)")
    ap.add_argument("--float64", action="store_true", help="the base's feature products in float64 (FLOAT64)")
    args = ap.parse_args()
    if args.base is not None:
        args.rev = f"{args.base}" + (" (float64 products)" if args.float64 else "")
    elif args.rev is None:
        args.rev = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                  capture_output=True, text=True).stdout.strip()[:12]
    tmp = Path(tempfile.mkdtemp(prefix="nscheck-"))
    try:
        arrays = make_states(tmp, args.steps, args.units)
        base = ROOT.joinpath("zoo/samples/linux.c").read_text()
        text = (base * (args.steps // len(base) + 1))[: args.steps]
        names = default_features("c")
        old_find = old_search(args.rev, tmp, args.base, args.float64)
        for fn in (old_find, find_neurons):          # compile both versions' kernels before timing
            fn({k: a[:20000] for k, a in arrays.items()}, names, text=text[:20000], progress=False)
        t0 = time.perf_counter()
        old = old_find(arrays, names, text=text, progress=False)
        t1 = time.perf_counter()
        new = find_neurons(arrays, names, text=text, progress=False)
        t2 = time.perf_counter()
        bad = compare(old, new)
        print(f"{args.steps:,} steps x {args.units:,} units: {args.rev} {t1 - t0:.1f} s, this checkout {t2 - t1:.1f} s")
        print("\n".join(bad) if bad else f"every column of {len(new):,} rows equals {args.rev}'s (scores to 1e-9, "
              "p, q and z to 1e-9 relative, the rest exactly)")
        sys.exit(1 if bad else 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
