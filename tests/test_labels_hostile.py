"""Hostile inputs for the label products (``analysis.labels``), from a review: each compared with plain
float64 products with the normalised columns (``test_labels.reference``), to the same tolerance as
``test_labels`` (1e-12 of the largest product)."""
import numpy as np
import pandas as pd
import pytest

from rnnscope.analysis.labels import Labels
from rnnscope.analysis.neurons import _score_key

from test_labels import SHIFTS, reference


def _products(F, binary, segments, a, steps, chunk):
    part = Labels(F, binary, SHIFTS, segments)
    [acc] = _score_key(a, [(steps, part)], chunk=chunk)
    return (part, acc, *reference(F, binary, segments, a, steps))


def _units(rng, n, U, dtype):
    """Units that drift over the part (their sums centred on the first 1024 rows are far from 0)."""
    return (np.tanh(rng.standard_normal((n, U))) + np.linspace(0, 1, n)[:, None]).astype(dtype)


@pytest.mark.parametrize("kind", ["x1", "xd", "x2"])
def test_a_feature_far_from_zero_equals_float64_products(kind):
    """A feature with a large offset (a position in a long text, a timestamp): the products are taken on
    the values less a whole number near their mean, so the centre taken off afterwards, ``(sum d f -
    centre s1) / norm``, is under 1 (on the raw values it cancelled ``offset * s1`` down to the small
    true product: 9e-3 off at 1e12)."""
    rng = np.random.default_rng(3)
    n, U = 3000, 8
    if kind == "x1":       # a depth changing on 1 row in 16: through its changes
        f = np.cumsum(rng.choice([-1] + [0] * 30 + [1], n)).astype(float) + 1e12
    elif kind == "xd":     # dense: BLAS
        f = rng.standard_normal(n) + 1e8
    else:                  # a column within lines: a ramp
        f = np.concatenate([np.arange(k) for k in rng.integers(16, 60, n)])[:n].astype(float) + 1e9
    F = pd.DataFrame({"f": f})
    part, acc, want_x, _ = _products(F, [], [1200, 801, 999], _units(rng, n, U, np.float32), np.arange(n), 700)
    assert len(part.groups[kind]) == 1 + SHIFTS
    np.testing.assert_allclose(acc["xc"], want_x, rtol=0, atol=1e-12 * np.abs(want_x).max())


def test_ramp_products_over_one_long_block_equal_float64_products():
    """Ramps through their changes of slope: ``c0 = f(0) - sum change * (u - 1)`` grows as the square of
    the rows the sums span, and ``Q(u) - (u - 1) P(u)`` cancels terms of ``u * P``: over one block of
    3000 rows the products were 5e-9 off (1e-9 at the default chunk of 16384 rows), so the sums start
    again every ``kernels.SLOPE`` rows."""
    rng = np.random.default_rng(1)
    n, U = 3000, 8
    col = np.concatenate([np.arange(k) for k in rng.integers(16, 80, n)])[:n].astype(float)
    F = pd.DataFrame({"col": col})
    part, acc, want_x, _ = _products(F, [], None, _units(rng, n, U, np.float32), np.arange(n), n)
    assert len(part.groups["x2"]) == 1 + SHIFTS
    np.testing.assert_allclose(acc["xc"], want_x, rtol=0, atol=1e-12 * np.abs(want_x).max())
