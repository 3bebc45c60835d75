"""Pattern search as pure functions: planted units, checked against means taken by hand."""
import numpy as np
import pytest

from rnnscope.analysis.gradflow import gradient_norms
from rnnscope.analysis.patterns import rank_units, span_scores


def planted(T=200, U=12, a=80, b=100, unit=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (T, U))
    x[a:b, unit] += 3.0                      # on inside the span, off around it
    x[:, 2] += 3.0                           # on everywhere: high inside, but as high around
    return x


def test_the_planted_unit_ranks_first_and_a_unit_on_everywhere_does_not():
    x = planted()
    s = span_scores(x, 80, 100)
    order = np.argsort(-s["score"])
    assert order[0] == 7
    assert s["score"][7] > 2.5 and abs(s["score"][2]) < 1
    ranked = rank_units({"rnn.l0.h": s, "rnn.l1.h": span_scores(planted(unit=3, seed=1), 80, 100)}, 3)
    assert {(k, i) for k, i, *_ in ranked[:2]} == {("rnn.l0.h", 7), ("rnn.l1.h", 3)}
    assert [r[4] for r in ranked] == sorted((r[4] for r in ranked), reverse=True)


def test_scores_match_means_taken_by_hand():
    x = planted()
    a, b = 80, 100
    s = span_scores(x, a, b)
    for u in range(x.shape[1]):
        inside = sum(x[t, u] for t in range(a, b)) / (b - a)
        around_rows = list(range(a - (b - a), a)) + list(range(b, b + (b - a)))
        around = sum(x[t, u] for t in around_rows) / len(around_rows)
        sd = float(np.sqrt(np.mean((x[:, u] - x[:, u].mean()) ** 2))) + 1e-6
        assert s["inside"][u] == pytest.approx(inside)
        assert s["around"][u] == pytest.approx(around)
        assert s["score"][u] == pytest.approx((inside - around) / sd)


def test_span_at_the_edge_nan_units_and_bad_spans():
    x = planted()
    s = span_scores(x, 0, 20)                # nothing before it: around is the stretch after
    assert s["around"][7] == pytest.approx(x[20:40, 7].mean())
    whole = span_scores(x, 0, 200)           # nothing around at all
    assert np.all(whole["around"] == 0)
    x[:, 5] = np.nan
    s = span_scores(x, 80, 100)
    assert np.isnan(s["score"][5]) and np.isfinite(s["score"][7])
    assert all(i != 5 for _, i, *_ in rank_units({"k.l0.h": s}, 12))
    with pytest.raises(ValueError):
        span_scores(x, 30, 30)
    with pytest.raises(ValueError):
        span_scores(x, 190, 201)


def test_window_gradient_norms_are_the_l2_norm_per_step():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 6))
    norms = gradient_norms({"rnn.l0.grad_h": g}, text="x" * 50)["rnn.l0.grad_h"].to_numpy()
    assert norms == pytest.approx([np.sqrt(sum(v * v for v in row)) for row in g])
