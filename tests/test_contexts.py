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


# ---- a Run of many short documents: no window, page or export runs two of them together -----------------

import torch  # noqa: E402

from test_documents import Tagger  # noqa: E402  (a char GRU tagger)

# short documents, some not ASCII: a CR ending one and an LF starting the next are "\r\n" in text.txt
SHORT = ["abc", "d\u00e9fg", "hi\r", "\njk", "\u4e2d\u6587\u3002", "op", "q\u202ers tu"]


def bos_eos(text: str):
    """(ids, spans): BOS, a step per character, EOS; BOS and EOS read no text."""
    ids = torch.tensor([1] + [ord(c) % 29 + 3 for c in text] + [2])
    return ids, np.array([(-1, -1)] + [(i, i + 1) for i in range(len(text))] + [(-1, -1)], np.int64)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return record(Tagger(), SHORT, tmp_path_factory.mktemp("short") / "run", encode=bos_eos, loss=None,
                  dtype="float32", progress=False)


def test_context_windows_stop_at_their_documents_ends(short_run):
    from rnnscope.analysis.report import _escape, unit_contexts
    from rnnscope.dashboards.figures import shown_text
    from rnnscope.dashboards.queries import context_rows
    from rnnscope.dashboards.steps import Documents
    from rnnscope.errors import escaped
    run = short_run
    assert run.text == "".join(SHORT)                   # back to back: the documents table holds the bounds
    tab = top_contexts(run, k=8, window=12, progress=False)     # a window longer than any document
    docs = run.documents
    for _, r in tab.iterrows():
        d = int(run.step_document[r["step"]])
        a, b = docs.char_start[d], docs.char_end[d]
        assert a <= r["char_start"] and r["char_start"] + len(r["context"]) <= b
        assert r["context"] == SHORT[d][r["char_start"] - a:][:len(r["context"])]
        assert docs.step_start[d] <= r["start"] and r["start"] + len(r["values"]) <= docs.step_end[d]
    # what `analyze` prints and the contexts view shows of a window is that window: nothing joined on
    for unit, rows in tab.groupby("unit"):
        printed = [line.split(maxsplit=3)[3] for line in unit_contexts(tab, unit, k=8).splitlines()
                   if line.startswith("  ")]
        want = [_escape(c) for c in rows["context"]]                 # top by rank, then bottom
        assert [p.replace("[", "").replace("]", "") for p in printed] == want
        named = [line for line in unit_contexts(tab, unit, k=8, documents=docs).splitlines() if line[:2] == "  "]
        for line, d in zip(named, run.step_document[rows["step"]], strict=True):    # analyze --unit's lines
            assert f"doc {d}: {escaped(docs.name[d])}  " in line
        table = context_rows(tab, unit, Documents(docs))
        assert sorted(c.replace("[", "").replace("]", "") for c in table["context"]) == \
            sorted(shown_text(c) for c in rows["context"])
        for step, document in zip(table["step"], table["document"]):       # counted as the picker counts
            d = int(run.step_document[int(step)])
            assert document == f"{d}: {shown_text(docs.name[d])}"
    assert "document" not in context_rows(tab, unit, Documents(docs.iloc[:1]))


def test_every_text_page_and_export_shows_one_document(short_run):
    from bokeh.models import ColumnDataSource
    from rnnscope.dashboards.app import RunData
    from rnnscope.dashboards.export import unit_figure
    from rnnscope.dashboards.queries import text_cells
    docs = short_run.documents

    def drawn(cells, d) -> str:
        """The characters drawn, by their positions in text.txt, all inside document ``d``."""
        pos = [int(p) for p in cells["pos"] if p >= 0]
        assert all(docs.char_start[d] <= p < docs.char_end[d] for p in pos)
        return "".join(short_run.text[p] for p in pos)
    data = RunData(short_run.path, window=3)          # a page shorter than some documents, longer than others
    sel = data.first_selection()
    pages = {}
    for _ in range(3 * len(SHORT)):
        s, e = data.span(sel)
        pages[s] = drawn(text_cells(data.run, data.docs, sel.document, sel.key, sel.index, s, e).cells, sel.document)
        sel.set(**data.turn(sel, +1))
    assert "".join(pages[s] for s in sorted(pages)) == short_run.text       # every character once, in order
    for d, doc in enumerate(SHORT):             # the export draws the whole document it is given, nothing more
        fig = unit_figure(short_run, "gru.l0.h:0", document=str(d))
        cells = next(m for m in fig.references() if isinstance(m, ColumnDataSource) and "pos" in m.data)
        assert drawn(cells.data, d) == doc
