"""Control tasks: a unit is selective for a feature only when it beats what the characters alone
(current and previous) give away. Checked on planted units and against a plain-Python control."""
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from rnnscope.analysis import features, find_neurons
from rnnscope.analysis.controls import character_controls

TEXT = open("zoo/samples/linux.c").read()[:12000]
FEATURES = ["in_comment", "in_string", "in_double_quotes"]


def _auc(x, y):
    r = stats.rankdata(x)
    n1 = y.sum()
    return (r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1))


def _brute_control(text, f, split, binary):
    """The feature's mean per (previous, current) character on the selection part, one pseudo-count
    at the overall mean, scored held out."""
    sums, counts = defaultdict(float), defaultdict(int)
    mean = f[:split].mean()
    for t in range(split):
        pair = (text[t - 1] if t else None, text[t])
        sums[pair] += f[t]
        counts[pair] += 1
    pred = np.array([(sums[(text[t - 1], text[t])] + mean) / (counts[(text[t - 1], text[t])] + 1)
                     for t in range(split, len(text))])
    return _auc(pred, f[split:]) if binary else np.corrcoef(pred, f[split:])[0, 1]


def test_control_matches_a_plain_lookup():
    F = features.compute(TEXT, FEATURES + ["column"]).astype(float)
    split = 8400
    ctl = character_controls(TEXT, F, FEATURES, split).set_index("feature")
    for name in F.columns:
        want = _brute_control(TEXT, F[name].to_numpy(), split, name in FEATURES)
        assert ctl.loc[name, "control_score"] == pytest.approx(want, abs=1e-12)
    # the characters give much away: a comment's English letter pairs and ' * ' margins, a string's '"'
    assert (ctl.loc[FEATURES, "control_score"] > 0.8).all()


def test_comment_cell_stays_selective_a_quote_detector_does_not():
    rng = np.random.default_rng(0)
    T = len(TEXT)
    F = features.compute(TEXT, FEATURES).astype(float)
    chars = np.array(list(TEXT))
    by_char = F.assign(c=chars).groupby("c")["in_string"].mean()
    h = rng.normal(size=(T, 3))
    h[:, 0] += 5.0 * F["in_comment"].to_numpy()            # encodes the feature, many characters long
    h[:, 1] += 4.0 * (chars == '"')                         # fires on the quote character only
    h[:, 2] = by_char[chars].to_numpy() + 0.01 * h[:, 2]   # the best function of the current character
    tab = find_neurons({"rnn.l0.h": h.astype(np.float32)}, FEATURES, text=TEXT, progress=False)
    tab = tab.set_index(["unit", "feature"])
    comment = tab.loc[("rnn.l0.h:0", "in_comment")]
    assert comment["heldout_score"] > 0.95 and comment["selectivity"] > 0.04
    assert comment["selectivity"] == pytest.approx(comment["heldout_score"] - comment["control_score"])
    for name in ("in_string", "in_double_quotes"):
        assert tab.loc[("rnn.l0.h:1", name), "selectivity"] < 0
        lookup = tab.loc[("rnn.l0.h:2", name)]
        assert lookup["heldout_score"] > 0.8 and lookup["selectivity"] < 0.01   # strong, yet not selective
