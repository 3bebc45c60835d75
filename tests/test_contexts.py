"""Top contexts per unit: the streamed running top-k against a brute-force sort, on a trace and on a
recorded Run; bad k is one clear error."""
import numpy as np
import pytest

from rnnscope.analysis.contexts import top_contexts
from rnnscope.errors import RnnscopeError
from rnnscope.probe import record

TEXT = open("zoo/samples/linux.c").read()[:700]


def _brute(a, text, k, window):
    """Sort every unit's values (NaN last on both sides, equal values by the earlier step) and cut
    the windows by hand."""
    rows = []
    T = len(text)
    for u in range(a.shape[1]):
        v = a[:, u].astype(np.float64)
        for side, key in (("top", -np.where(np.isnan(v), -np.inf, v)), ("bottom", np.where(np.isnan(v), np.inf, v))):
            order = sorted(range(T), key=lambda t: (key[t], t))[:k]
            for rank, t in enumerate(order):
                lo, hi = max(0, t - (window - window // 4) + 1), min(T, t + window // 4 + 1)
                rows.append((u, side, rank, t, text[lo:hi], a[lo:hi, u].astype(np.float32)))
    return rows


def _check(tab, key, a, text, k, window):
    got = tab[tab["key"] == key]
    want = _brute(a, text, k, window)
    assert len(got) == len(want)
    for (_, r), (u, side, rank, t, ctx, vals) in zip(got.iterrows(), want):
        assert (r["index"], r["side"], r["rank"], r["step"], r["context"]) == (u, side, rank, t, ctx)
        assert r["unit"] == f"{key}:{u}" and r["context"][r["offset"]] == text[t]
        np.testing.assert_array_equal(r["values"], vals)
        assert r["value"] == vals[r["offset"]] or (np.isnan(r["value"]) and np.isnan(vals[r["offset"]]))


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_streamed_top_k_matches_a_full_sort(chunk):
    rng = np.random.default_rng(0)
    T = len(TEXT)
    h = rng.normal(size=(T, 5)).astype(np.float32)
    h[:, 1] = np.round(h[:, 1])                 # many equal values: the earliest steps win
    h[:, 2] = 1.0                               # a saturated unit: every value ties
    h[10, 3] = np.nan
    g = rng.uniform(size=(T, 3)).astype(np.float16)
    tab = top_contexts({"rnn.l0.h": h, "rnn.l0.f": g}, k=6, window=13, text=TEXT, chunk=chunk, progress=False)
    assert len(tab) == 2 * 6 * (5 + 3)
    _check(tab, "rnn.l0.h", h, TEXT, 6, 13)
    _check(tab, "rnn.l0.f", g, TEXT, 6, 13)


def test_contexts_of_a_recorded_run(tmp_path, tiny_checkpoint):
    from rnnscope.zoo import load
    ck = load(str(tiny_checkpoint))
    text = "".join(c for c in TEXT.lower() if c in ck.vocab.chars)[:400]
    run = record(ck, text, tmp_path / "run", kinds=None, progress=False)
    tab = top_contexts(run, k=3, window=8, chunk=50, progress=False)
    assert set(tab["key"]) == set(run.keys())
    for key in run.keys():
        _check(tab, key, np.asarray(run[key]), run.text, 3, 8)


def test_bad_k_and_window():
    h = np.zeros((len(TEXT), 2), np.float32)
    with pytest.raises(RnnscopeError, match="larger than the text"):
        top_contexts({"rnn.l0.h": h}, k=len(TEXT) + 1, text=TEXT, progress=False)
    for bad in (0, -3):
        with pytest.raises(RnnscopeError, match="k >= 1"):
            top_contexts({"rnn.l0.h": h}, k=bad, text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="window >= 1"):
        top_contexts({"rnn.l0.h": h}, window=0, text=TEXT, progress=False)
    with pytest.raises(RnnscopeError, match="no key"):
        top_contexts({"rnn.l0.h": h}, keys=["rnn.l1.h"], text=TEXT, progress=False)
