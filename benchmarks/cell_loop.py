"""What recording a step loop costs (issue 21: every state and gate <= 1.3x the plain loop; every
gradient <= 1.5x the plain forward and backward).

A 512-unit ``nn.LSTMCell`` (512 inputs) over ``--steps`` steps at batch 1 and 32 on the CPU:
  - states: the plain loop under ``no_grad`` against the same loop inside ``rs.Probe(cell)``,
    which records h, c and the four gates at every step;
  - gradients: the plain loop's forward and ``backward()`` of a weighted sum of every h against
    the same inside ``rs.Probe(cell, grad=True)``, which also records dL/dh_t and dL/dc_t.
Modes are interleaved repetition by repetition, so drift hits both alike; min and median per mode
and the ratios of the mins, all from the same run.

    python benchmarks/cell_loop.py [--steps 2000] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rnnscope as rs  # noqa: E402


def loop(cell, xs):
    """``xs [T, B, in]`` through the cell, from no state; returns every h ``[T, B, H]``."""
    st, hs = None, []
    for x in xs:
        st = cell(x, st)
        hs.append(st[0])
    return torch.stack(hs)


def states(cell, xs, probe: bool) -> None:
    with torch.no_grad():
        if probe:
            with rs.Probe(cell) as p:
                loop(cell, xs)
            assert p.trace["l0.g"].shape[1] == len(xs)
        else:
            loop(cell, xs)


def gradients(cell, xs, w, probe: bool) -> None:
    if probe:
        with rs.Probe(cell, grad=True) as p:
            (loop(cell, xs) * w).sum().backward()
        assert p.trace["l0.grad_c"].shape[1] == len(xs)
    else:
        (loop(cell, xs) * w).sum().backward()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--units", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cell = nn.LSTMCell(args.units, args.units)
    print(f"LSTMCell({args.units}, {args.units}), {args.steps} steps, {args.threads} thread(s), torch "
          f"{torch.__version__}; seconds per loop, min / median of {args.repeats}")
    print(f"{'batch':>6s}{'mode':>11s}{'plain':>17s}{'recorded':>17s}{'ratio (min)':>13s}{'target':>8s}")
    for B in (1, 32):
        xs = torch.randn(args.steps, B, args.units)
        w = torch.randn(args.steps, B, args.units)
        modes = {"states": (lambda p: states(cell, xs, p), 1.3), "gradients": (lambda p: gradients(cell, xs, w, p), 1.5)}
        for run, _ in modes.values():          # warm-up: allocator, first-call checks, thread pools
            run(False), run(True)
        times = {(m, p): [] for m in modes for p in (False, True)}
        for _ in range(args.repeats):
            for m, (run, _) in modes.items():
                for p in (False, True):
                    times[(m, p)].append(timed(lambda: run(p)))
        for m, (_, target) in modes.items():
            plain, rec = times[(m, False)], times[(m, True)]
            print(f"{B:6d}{m:>11s}{min(plain):8.3f} /{statistics.median(plain):7.3f}{min(rec):8.3f} /"
                  f"{statistics.median(rec):7.3f}{min(rec) / min(plain):13.2f}{target:8.1f}")


if __name__ == "__main__":
    main()
