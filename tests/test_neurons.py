"""Neuron search, checked against direct scipy computations; its null is calibrated on
autocorrelated noise; bad inputs give clear errors."""
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rnnscope.analysis import benjamini_hochberg, features, find_neurons, top_units
from rnnscope.analysis.nulls import circular_scores
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


def _ar1(T, U, rho, rng):
    e = rng.normal(size=(T, U))
    h = np.zeros_like(e)
    for t in range(1, T):
        h[t] = rho * h[t - 1] + e[t]
    return h


def test_selection_never_looks_at_the_heldout_part():
    """Issue 15: one unit tracks in_comment over the whole text; 40 decoys track it only on the
    held-out part (noise before), more strongly there. Ranked by held-out score a decoy would win;
    ranked on the selection part the tracking unit comes first, and its held-out score is reported."""
    T = len(TEXT)
    split = int(round(T * 0.7))
    rng = np.random.default_rng(3)
    f = features.in_comment(TEXT).astype(float)
    h = rng.normal(size=(T, 41))
    h[:, 0] += 0.8 * f
    h[split:, 1:] += 2.5 * f[split:, None]
    tab = find_neurons({"rnn.l0.h": h.astype(np.float32)}, ["in_comment"], text=TEXT, select=5, progress=False)
    assert tab.loc[tab["heldout_score"].idxmax(), "unit"] != "rnn.l0.h:0"      # a decoy is best held out
    assert tab.iloc[0]["unit"] == "rnn.l0.h:0"
    assert top_units(tab, 1).iloc[0]["unit"] == "rnn.l0.h:0"
    first = tab.iloc[0]
    assert first["selection_q"] < 1e-3 and first["heldout_q"] < 1e-3 and first["selected"]
    assert first["score"] == first["selection_score"] and first["q_value"] == first["heldout_q"]
    decoys = tab[tab["unit"] != "rnn.l0.h:0"]
    assert (decoys["selection_q"] > 0.05).mean() > 0.9        # they know nothing where they were selected
    assert tab.attrs["units_tested"] == 41 and tab.attrs["features_tested"] == 1 and tab.attrs["tests"] == 41
    assert tab.attrs["selected"] == 5 and tab["selected"].sum() == 5 and tab["heldout_q"].notna().sum() == 5


def test_circular_scores_match_rolled_features():
    rng = np.random.default_rng(0)
    n = 1001
    x = rng.normal(size=n).astype(np.float32)
    y = (rng.uniform(size=n) < 0.3).astype(float)
    c = rng.normal(size=n)
    auc, r = circular_scores(x, y, True), circular_scores(x, c, False)
    x16 = x.astype(np.float16).astype(np.float64)          # the search ranks at float16 resolution
    for s in (0, 1, 17, 500, 1000):
        assert auc[s] == pytest.approx(_auc(x16, np.roll(y, s)), abs=2e-3)
        assert r[s] == pytest.approx(np.corrcoef(x, np.roll(c, s))[0, 1], abs=1e-9)


def test_stronger_units_never_get_worse_q_values():
    """Planted units of known strength on the same slowly drifting noise: the selected units' held-out
    p (every admissible circular shift) is monotone in strength and resolves far below the 1/17 that
    16 shifts allow."""
    rng = np.random.default_rng(4)
    T = len(TEXT)
    f = features.in_comment(TEXT).astype(float)
    c = features.column(TEXT).astype(float)
    a = np.linspace(0.0, 6.0, 13)
    noise = _ar1(T, 1, 0.9, rng)
    h = np.concatenate([noise + a * f[:, None], noise + a * c[:, None] / 40], 1).astype(np.float32)
    tab = find_neurons({"rnn.l0.h": h}, {"in_comment": features.in_comment, "column": features.column},
                       text=TEXT, select=26, progress=False).set_index(["unit", "feature"])
    for name, offset in (("in_comment", 0), ("column", 13)):
        rows = tab.loc[[(f"rnn.l0.h:{offset + i}", name) for i in range(13)]]
        assert (rows["heldout_shifts"] > 3000).all()
        assert (np.diff(rows["heldout_q"].to_numpy()) <= 0).all()
        assert (np.diff(rows["heldout_p"].to_numpy()) <= 0).all()
        assert rows["heldout_p"].iloc[-1] < 1e-6 and rows["heldout_p_empirical"].iloc[-1] < 1 / 3000
        assert rows["heldout_p"].iloc[0] > 0.05


def test_resolved_null_is_calibrated_on_autocorrelated_noise():
    """The full-shift null given to selected units keeps the ~5% false-positive rate on AR(1) 0.98
    units that know nothing (every unit selected here, so every row gets it)."""
    rng = np.random.default_rng(1)
    T, U = len(TEXT), 300
    h = _ar1(T, U, 0.98, rng).astype(np.float32)
    tab = find_neurons({"rnn.l0.h": h}, ["in_comment", "column", "indent"], text=TEXT, select=U, progress=False)
    assert tab["selected"].all() and (tab["heldout_shifts"] > 3000).all()
    assert 0.02 < (tab["heldout_p"] < 0.05).mean() < 0.08
    assert 0.02 < (tab["heldout_p_empirical"] < 0.05).mean() < 0.08
    assert (tab["heldout_q"] < 0.05).mean() < 0.01
    assert 0.02 < (tab["selection_p"] < 0.05).mean() < 0.09      # the streamed selection-part null too


def test_a_float32_run_is_scored_like_its_float16_twin(tmp_path, tiny_vocab):
    """A float32 Run's rows come read-only from its memory map; the kernels once failed to compile on them."""
    from conftest import char_model
    from rnnscope.probe import record
    text = 'int f(void) {\n\t/* a "b" */\n\tif (x) { puts("hi"); }\n\treturn 0;\n}\n' * 8
    ck = char_model("lstm", tiny_vocab.__class__(tiny_vocab.chars + "/*"), hidden=8)
    r32 = record(ck, text, tmp_path / "r32", dtype="float32", progress=False)
    r16 = record(ck, text, tmp_path / "r16", dtype="float16", progress=False)
    a = find_neurons(r32, ["in_comment"], shifts=4, progress=False).set_index(["unit", "feature"])
    b = find_neurons(r16, ["in_comment"], shifts=4, progress=False).set_index(["unit", "feature"])
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["selection_score"], b.loc[a.index, "selection_score"], atol=0.02)


def test_kept_values_and_a_second_read_give_the_same_table(monkeypatch):
    """The held-out pass keeps each feature's first candidates; a selected unit it did not keep (the
    ones before it NaN on the held-out part only) is read again. Both ways give the same table, and
    a key named twice is scored once."""
    from rnnscope.analysis import neurons
    T = len(TEXT)
    h, f = _planted(T, U=24)
    h[:, 3:10] += 1.2 * f["in_comment"].to_numpy()[:, None]        # strong on both parts...
    h[-50, 3:10] = np.nan                                           # ...but NaN late: they drop out there
    reads = []
    real = neurons._blocks
    monkeypatch.setattr(neurons, "_blocks", lambda *a: (reads.append(1), real(*a))[1])
    kw = dict(text=TEXT, heldout=0.25, shifts=8, select=3, progress=False)
    tables = {}
    for spare in (0, 50):
        monkeypatch.setattr(neurons, "SPARE", spare)
        reads.clear()
        tables[spare] = find_neurons({"rnn.l0.h": h}, ["in_comment", "column"], **kw)
        tables[spare].attrs["reads"] = len(reads)
    assert tables[0].attrs["reads"] == 5 and tables[50].attrs["reads"] == 4    # 4: two passes x two parts
    a, b = tables[0], tables[50]
    pd.testing.assert_frame_equal(a, b)
    sel = a[a["selected"] & (a["feature"] == "in_comment")]
    assert not sel["unit"].isin([f"rnn.l0.h:{u}" for u in range(3, 10)]).any()
    twice = find_neurons({"rnn.l0.h": h}, ["in_comment"], keys=["rnn.l0.h", "rnn.l0.h"], **kw)
    assert len(twice) == h.shape[1]
