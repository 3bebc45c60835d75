"""The neuron search's products with the label columns (``analysis.labels``), every path checked
against plain float64 products with the normalised columns: columns through their changes (binary
runs, depths), ramps through their changes of slope, a few dense columns in the kernel, many dense
ones by BLAS; across several documents' shifts, chunks that do not divide the part, steps without
text, float16 and float32 values, a unit with NaN, a constant feature and its NaN ranks."""
import numpy as np
import pandas as pd
import pytest

from rnnscope.analysis import kernels, labels
from rnnscope.analysis.labels import Labels
from rnnscope.analysis.neurons import _score_key
from rnnscope.analysis.nulls import shifted

SHIFTS = 5


def frame(n: int, rng) -> tuple[pd.DataFrame, list[str]]:
    runs = np.repeat(rng.integers(0, 2, n // 40 + 1), 40)[:n].astype(float)           # binary, long runs
    flicker = (rng.random(n) < 0.5).astype(float)                                      # binary, changes often
    depth = np.cumsum(rng.choice([-1, 0, 0, 0, 0, 0, 0, 1], n)).astype(float)          # piecewise constant
    column = np.concatenate([np.arange(k) for k in rng.integers(5, 60, n)])[:n].astype(float)   # ramps
    noise = rng.standard_normal(n)                                                       # dense, arbitrary
    flat = np.full(n, 3.0)                                                               # constant: NaN ranks
    F = pd.DataFrame({"runs": runs, "flicker": flicker, "depth": depth, "column": column, "noise": noise,
                      "flat": flat})
    return F, ["runs", "flicker"]


def reference(F: pd.DataFrame, binary: list[str], segments, a: np.ndarray, steps: np.ndarray):
    """``x @ X`` and ``ranks @ R`` in float64 over the rows ``steps`` of ``a``, with the columns built as
    the search defines them (the mid-ranks from the kernels' own histogram, tested on their own)."""
    values = a[steps]
    U = values.shape[1]
    bits = kernels.float16_bits(values)
    counts = np.zeros((U, kernels.BINS), np.int32)
    kernels.histogram(bits, counts)
    mid, rank_ss = np.empty((U, kernels.BINS), np.float32), np.empty(U)
    kernels.midranks(counts, len(steps), mid, rank_ss)
    ref = np.nan_to_num(np.asarray(a[steps[:1024]], np.float64).mean(0))
    X, R = [], []
    for name in F.columns:
        f = F[name].to_numpy(np.float64)
        if name in binary:
            R.append(shifted(f, SHIFTS, segments))
            continue
        fz = f - f.mean()
        norm = np.sqrt((fz ** 2).sum())
        X.append(shifted(fz / norm, SHIFTS, segments) if norm > 0 else np.zeros((len(f), 1 + SHIFTS)))
        rk = labels.ranks(f)
        rk -= rk.mean()
        rnorm = np.sqrt((rk ** 2).sum())
        R.append((rk / rnorm if rnorm > 0 else np.full(len(f), np.nan))[:, None])
    X, R = np.hstack(X), np.hstack(R)
    units = np.arange(values.shape[1])
    rank = mid[units[None, :], kernels.BIN_OF[bits]].astype(np.float64)
    with np.errstate(invalid="ignore"):
        return (values.astype(np.float64) - ref) .T @ X, rank.T @ R


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("path", ["default", "all dense in BLAS", "all through changes", "dense in the kernel"])
def test_every_path_equals_float64_products_with_the_normalised_columns(monkeypatch, dtype, path):
    rng = np.random.default_rng(1)
    n, U = 3001, 37                         # units past one block of 32; rows past several tiles
    F, binary = frame(n, rng)
    segments = [1200, 801, 1000]
    if path == "all dense in BLAS":
        monkeypatch.setattr(labels, "SPARSE", 0.0)
        monkeypatch.setattr(labels, "IN_KERNEL", 0)
    elif path == "all through changes":
        monkeypatch.setattr(labels, "SPARSE", 1.0)
    elif path == "dense in the kernel":
        monkeypatch.setattr(labels, "SPARSE", 0.0)
        monkeypatch.setattr(labels, "IN_KERNEL", 10 ** 6)
    part = Labels(F, binary, SHIFTS, segments)
    groups = {g: len(v) for g, v in part.groups.items()}
    if path == "default":       # each kind of column is there: runs, ramps, BLAS (noise: 6 dense columns)
        assert groups["x1"] and groups["x2"] and groups["xd"] and groups["r1"] and part.blas["x"]
    steps = np.sort(rng.choice(n + 500, n, replace=False))        # steps without text between them
    a = np.tanh(rng.standard_normal((n + 500, U)) * 2).astype(dtype)
    a[:, 3] = 0.25                                                  # a constant unit
    a[100, 5] = np.nan                                              # a unit with NaN
    [acc] = _score_key(a, [(steps, part)], chunk=700)
    want_x, want_r = reference(F, binary, segments, a, steps)
    ok = np.ones(U, bool)
    ok[5] = False
    assert acc["bad"][5] and not acc["bad"][ok].any() and acc["constant"][3]
    assert np.isnan(acc["xc"][5]).all()                            # NaN reaches its products
    scale_x, scale_r = np.abs(want_x[ok]).max(), np.abs(want_r[ok][:, np.isfinite(want_r).all(0)]).max()
    np.testing.assert_allclose(acc["xc"][ok], want_x[ok], rtol=0, atol=1e-12 * scale_x)
    np.testing.assert_allclose(acc["rc"][ok], want_r[ok], rtol=0, atol=1e-12 * scale_r, equal_nan=True)
    flat = part.slots["flat\0rank"][1]
    assert np.isnan(acc["rc"][:, flat]).all() and (acc["xc"][ok, part.slots["flat"][1]] == 0).all()


def test_a_binary_features_rank_products_are_exact(monkeypatch):
    """Half-integer ranks times changes of +-1: the rank sums (and so the AUCs) are exact integers / 2."""
    rng = np.random.default_rng(2)
    n, U = 5000, 8
    F, binary = frame(n, rng)
    part = Labels(F[["runs"]], ["runs"], SHIFTS)
    a = rng.standard_normal((n, U)).astype(np.float16)
    [acc] = _score_key(a, [(np.arange(n), part)], chunk=999)
    twice = 2 * acc["rc"]
    assert np.array_equal(twice, np.round(twice))


_TABLE_RUN = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_labels import frame, SHIFTS
from rnnscope.analysis import kernels
from rnnscope.analysis.labels import Labels
from rnnscope.analysis.neurons import _score_key
rng = np.random.default_rng(4)
F, binary = frame(2000, rng)
a = np.tanh(rng.standard_normal((2000, 40)) * 2).astype(np.float16)
[acc] = _score_key(a, [(np.arange(2000), Labels(F, binary, SHIFTS))], chunk=700)
np.savez({out!r}, native=kernels.NATIVE_HALF, xc=acc["xc"], rc=acc["rc"], sd=acc["sd"])
"""


def test_float16_values_by_the_table_equal_the_cpus_own_conversion(tmp_path):
    """Where numba compiles for a CPU that cannot convert float16 (``NUMBA_CPU_NAME=generic``, its setting
    for portable caches: the host's F16C is not the target's, and the native conversion would abort the
    process in the JIT) the kernel decodes through ``VALUE_OF``: the same products to the bit as the
    native conversion (a fresh numba cache, so the kernel is compiled for that target, not loaded)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    got = {}
    for name, env in (("table", {"NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}),
                      ("default", {})):
        out = tmp_path / f"{name}.npz"
        code = _TABLE_RUN.format(tests=str(Path(__file__).parent), out=str(out))
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env}, timeout=300)
        got[name] = np.load(out)
    assert not got["table"]["native"]
    for key in ("xc", "rc", "sd"):
        assert np.array_equal(got["table"][key], got["default"][key], equal_nan=True)
