"""Neuron search, checked against direct scipy computations; its null is calibrated on
autocorrelated noise; bad inputs give clear errors."""
import warnings

import numpy as np
import pytest
from scipy import stats

from rnnscope.analysis import benjamini_hochberg, features, find_neurons
from rnnscope.analysis.gates import gate_saturation
from rnnscope.analysis.sparse import sparse_probe
from rnnscope.errors import RnnscopeError

TEXT = open("zoo/samples/linux.c").read()[:12000]


def _planted(T, U=6, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = features.compute(TEXT[:T], ["in_comment", "column"])
    h = rng.normal(size=(T, U))
    h[:, 0] += 1.5 * f["in_comment"].to_numpy()
    h[:, 1] -= 0.04 * f["column"].to_numpy()
    h[:, 2] = np.tanh(h[:, 2])
    return h.astype(dtype), f


def _auc(x, y):
    r = stats.rankdata(x)
    n1 = y.sum()
    return (r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scores_match_scipy(dtype):
    T = len(TEXT)
    h, f = _planted(T, dtype=dtype)
    tab = find_neurons({"rnn.l0.h": h}, ["in_comment", "column"], text=TEXT, heldout=0.25, shifts=8,
                       progress=False).set_index(["unit", "feature"])
    split = int(round(T * 0.75))
    x = h.astype(np.float64)
    for u in range(h.shape[1]):
        unit = f"rnn.l0.h:{u}"
        y = f["in_comment"].to_numpy()
        disc, held = _auc(x[:split, u], y[:split]), _auc(x[split:, u], y[split:])
        row = tab.loc[(unit, "in_comment")]
        if disc < 0.5:                                   # oriented on the selection part
            disc, held = 1 - disc, 1 - held
        assert row["direction"] == (1 if _auc(x[:split, u], y[:split]) >= 0.5 else -1)
        # ranks are taken at float16 resolution with 3 mantissa bits dropped: near ties merge
        assert abs(row["score"] - disc) < 2e-3 and abs(row["heldout_score"] - held) < 2e-3
        c = f["column"].to_numpy()
        row = tab.loc[(unit, "column")]
        assert row["score"] == pytest.approx(np.corrcoef(x[:split, u], c[:split])[0, 1], abs=1e-5)
        assert row["heldout_score"] == pytest.approx(np.corrcoef(x[split:, u], c[split:])[0, 1], abs=1e-5)
        assert row["spearman"] == pytest.approx(stats.spearmanr(x[:split, u], c[:split])[0], abs=5e-3)
    top = tab.reset_index().groupby("feature").head(1).set_index("feature")["unit"]
    assert top["in_comment"] == "rnn.l0.h:0" and top["column"] == "rnn.l0.h:1"
    assert tab.loc[("rnn.l0.h:0", "in_comment"), "q_value"] < 1e-3
    assert tab.loc[("rnn.l0.h:1", "column"), "direction"] == -1


def test_null_is_calibrated_on_autocorrelated_noise():
    """Units that drift slowly (AR(1), 0.98) and know nothing: about 5% should have p < 0.05. An
    i.i.d. shuffle null would flag far more (checked below), which is why the null uses shifts."""
    rng = np.random.default_rng(1)
    T, U = len(TEXT), 300
    e = rng.normal(size=(T, U))
    h = np.zeros_like(e)
    for t in range(1, T):
        h[t] = 0.98 * h[t - 1] + e[t]
    tab = find_neurons({"rnn.l0.h": h.astype(np.float32)}, ["in_comment", "column", "indent"], text=TEXT,
                       progress=False)
    assert 0.01 < (tab["p_value"] < 0.05).mean() < 0.09
    assert (tab["q_value"] < 0.05).mean() < 0.01
    # the naive null: r against i.i.d. data, p from the t distribution with n - 2 degrees of freedom
    held = tab[tab.metric == "pearson"]
    n = int(round(T * 0.3))
    t = held["heldout_score"] * np.sqrt((n - 2) / (1 - held["heldout_score"] ** 2))
    naive = 2 * stats.t.sf(np.abs(t), n - 2)
    assert (naive < 0.05).mean() > 0.3


def test_benjamini_hochberg_matches_definition():
    rng = np.random.default_rng(0)
    p = np.append(rng.uniform(size=200) ** 3, np.nan)
    q = benjamini_hochberg(p)
    ps = np.sort(p[:-1])
    m = len(ps)
    brute = [min(1, min(ps[j] * m / (j + 1) for j in range(i, m))) for i in range(m)]
    assert np.allclose(np.sort(q[:-1]), np.sort(brute)) and np.isnan(q[-1])


def test_bad_inputs():
    h, _ = _planted(len(TEXT))
    with pytest.raises(RnnscopeError, match="shape"):
        find_neurons({"rnn.l0.h": h[:-5]}, ["column"], text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="one number per character"):
        find_neurons({"rnn.l0.h": h}, {"short": lambda s: np.zeros(3)}, text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="NaN or Inf"):
        find_neurons({"rnn.l0.h": h}, {"bad": lambda s: np.full(len(s), np.nan)}, text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="every feature is constant"):
        find_neurons({"rnn.l0.h": h}, {"flat": lambda s: np.ones(len(s))}, text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="needs its text"):
        find_neurons({"rnn.l0.h": h}, ["column"], progress=False)
    with pytest.raises(RnnscopeError, match="no f/i/o/r/z keys"):
        gate_saturation({"rnn.l0.h": h}, text=TEXT)
    with pytest.warns(UserWarning, match="constant"):
        find_neurons({"rnn.l0.h": h}, {"flat": lambda s: np.ones(len(s)), "column": features.column},
                     text=TEXT, progress=False)


def test_nan_unit_scores_nan_and_others_survive():
    h, _ = _planted(len(TEXT))
    h[100, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = find_neurons({"rnn.l0.h": h}, ["in_comment"], text=TEXT, progress=False).set_index("unit")
    assert np.isnan(tab.loc["rnn.l0.h:3", "score"]) and np.isnan(tab.loc["rnn.l0.h:3", "p_value"])
    assert tab.loc["rnn.l0.h:0", "heldout_score"] > 0.8
    assert tab.index[-1] == "rnn.l0.h:3"           # NaN sorts last


def test_gate_saturation_counts():
    rng = np.random.default_rng(0)
    g = rng.uniform(size=(1000, 4)).astype(np.float32)
    sat = gate_saturation({"rnn.l0.f": g, "rnn.l0.h": g}, text="x" * 1000).set_index("unit")
    assert list(sat.index) == [f"rnn.l0.f:{i}" for i in range(4)]
    assert np.allclose(sat["left"], (g < 0.1).mean(0)) and np.allclose(sat["right"], (g > 0.9).mean(0))


def test_sparse_probe_finds_the_planted_unit_first():
    h, _ = _planted(len(TEXT), U=40)
    path = sparse_probe({"rnn.l0.h": h}, "in_comment", text=TEXT)
    first = path[path.n_units > 0].iloc[0]
    assert first["units"].split(",")[0] == "rnn.l0.h:0"
    assert path["heldout_score"].max() > 0.8 and path.attrs["units_needed"] <= 3
