"""Analyses on a Run whose steps are not characters: words with BOS/EOS steps, several documents.
Scores are checked against direct scipy computations on the scored steps; the within-document
shift null is checked on planted units; nothing ever crosses a document boundary."""
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rnnscope.analysis import features, find_neurons
from rnnscope.analysis.contexts import top_contexts
from rnnscope.analysis.features import on_tokens
from rnnscope.analysis.gradflow import decay_ends
from rnnscope.analysis.nulls import circular_scores, resolved_test, shifted
from rnnscope.analysis.parts import split_steps
from rnnscope.analysis.patterns import span_scores
from rnnscope.analysis.source import Source
from rnnscope.analysis.sparse import sparse_probe
from rnnscope.errors import RnnscopeError


def word_source(docs: dict[str, str], arrays_of=None, bos=True) -> Source:
    """A word-level layout: per document BOS, one step per whitespace-separated word, EOS."""
    text, spans, rows = "", [], []
    for name, doc in docs.items():
        c0, s0 = len(text), len(spans)
        if bos:
            spans.append((-1, -1))
        spans += [(c0 + m.start(), c0 + m.end()) for m in re.finditer(r"\S+", doc)]
        if bos:
            spans.append((-1, -1))
        text += doc
        rows.append({"name": name, "char_start": c0, "char_end": len(text), "step_start": s0, "step_end": len(spans)})
    src = Source(text, {}, spans=np.array(spans), documents=pd.DataFrame(rows), language=None)
    if arrays_of is not None:
        src.arrays.update(arrays_of(src))
    return src


def quote_docs(n_docs=8, words=300, seed=0) -> dict[str, str]:
    """Documents of words where double quotes open and close every few words."""
    rng = np.random.default_rng(seed)
    docs = {}
    for d in range(n_docs):
        out, inside = [], False
        for _ in range(words):
            w = "".join(rng.choice(list("abcdefgh"), rng.integers(1, 6)))
            if rng.random() < 0.12:
                w, inside = ('"' + w) if not inside else (w + '"'), not inside
            out.append(w)
        docs[f"doc{d}"] = " ".join(out) + "\n"
    return docs


def test_a_step_takes_the_feature_at_the_last_character_of_its_span():
    src = word_source({"a": 'say "hi there" now\n'})
    f = src.per_step(features.in_double_quotes(src.text))
    assert src.tokens() == ["", "say", '"hi', 'there"', "now", ""]
    # after '"hi' we are inside; after 'there"' the quote has closed; BOS/EOS have no value
    assert np.isnan(f[0]) and np.isnan(f[-1])
    assert f[1:5].tolist() == [0, 1, 0, 0]
    with pytest.raises(RnnscopeError, match="do not tile the steps"):
        Source("ab", {}, spans=np.array([[0, 1], [1, 2]]),
               documents=pd.DataFrame({"name": ["x"], "char_start": [0], "char_end": [2],
                                       "step_start": [0], "step_end": [1]}))


def test_the_split_gives_whole_documents_closest_to_heldout():
    sizes = [100, 100, 300, 50, 150, 300]
    src = word_source({f"d{i}": "w " * n for i, n in enumerate(sizes)})
    sp = split_steps(src, 0.3)
    K = sum(sizes)
    # held-out shares at each document boundary: 900/1000, 800, 500, 450, 300 -> 0.3 is exact
    assert sp.documents == (["d0", "d1", "d2", "d3", "d4"], ["d5"]) and sp.at == K - 300
    assert sp.segments == ([100, 100, 300, 50, 150], [300])
    assert sp.step == src.step_bounds[5, 0] and src.has_text[sp.rows].all() and len(sp.rows) == K
    sp = split_steps(src, 0.5)
    assert sp.documents[1] == ["d3", "d4", "d5"]                  # 500 of 1000, vs 450 or 800
    with pytest.raises(RnnscopeError, match="cannot split 2 documents"):
        split_steps(word_source({"a": "w " * 500, "b": "w " * 5}), 0.3)


def test_streamed_shifts_never_cross_a_document_boundary():
    """A column constant inside each document is left unchanged by every within-document shift;
    a shift across a boundary would move one document's value into the next."""
    segs = [5, 17, 3, 40]
    col = np.repeat(np.arange(4.0), segs)
    assert (shifted(col, 16, segs) == col[:, None]).all()
    assert not (shifted(col, 16) == col[:, None]).all()           # the one-part shift does cross
    rng = np.random.default_rng(0)
    col = rng.normal(size=sum(segs))
    out, start = shifted(col, 7, segs), 0
    for m in segs:                       # each document's block is a rotation of that document
        block = col[start:start + m]
        for j in range(out.shape[1]):
            assert any((np.roll(block, o) == out[start:start + m, j]).all() for o in range(m))
        start += m


@pytest.mark.parametrize("binary", [True, False])
def test_every_shift_of_the_resolved_null_matches_rolling_each_document(binary):
    rng = np.random.default_rng(1)
    segs = [30, 7, 51]
    n = sum(segs)
    x = rng.permutation(n) + 1.0       # distinct at the float16 rank resolution the AUC uses
    f = (rng.random(n) < 0.3).astype(float) if binary else rng.normal(size=n)
    got = circular_scores(x, f, binary, segs)
    for s in range(0, n, 5):
        g = np.concatenate([np.roll(b, s * m // n) for b, m in
                            zip(np.split(f, np.cumsum(segs)[:-1]), segs)])
        if binary:
            r = stats.rankdata(x)
            want = (r[g == 1].sum() - g.sum() * (g.sum() + 1) / 2) / (g.sum() * (n - g.sum()))
        else:
            want = np.corrcoef(x, g)[0, 1]
        assert got[s] == pytest.approx(want, abs=1e-9)
    assert resolved_test(x, f, binary, 1, segs)["shifts"] == n - 1


def planted(n_docs=8, words=300, seed=0):
    """Word steps over quoted prose; unit 0 tracks being inside quotes, the others are AR(1) noise;
    every unit is 1e4 on BOS/EOS steps, which must never reach a score."""
    docs = quote_docs(n_docs, words, seed)

    def arrays(src):
        rng = np.random.default_rng(seed + 1)
        # each document's own track: a quote left open at one's end must not invert the next
        f = src.per_step(np.concatenate([features.in_double_quotes(src.text[a:b]) for a, b in
                                         src.documents[["char_start", "char_end"]].to_numpy()]))
        h = np.zeros((src.steps, 6))
        e = rng.normal(size=h.shape)
        for t in range(1, src.steps):
            h[t] = 0.9 * h[t - 1] + e[t]
        h[:, 0] += 3.0 * np.nan_to_num(f)
        h[~src.has_text] = 1e4
        return {"rnn.l0.h": h.astype(np.float32)}
    return word_source(docs, arrays)


def test_find_neurons_on_word_steps_matches_scipy_on_the_scored_steps():
    src = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = find_neurons(src, ["in_double_quotes", "column"], heldout=0.3, shifts=8, progress=False)
    assert tab.attrs["heldout_documents"] == ["doc6", "doc7"] and tab.attrs["scored_steps"] == 8 * 300
    # an independent reference: each document's own track, at each word's last character
    x, f, col, held = [], [], [], []
    for i, row in src.documents.iterrows():
        doc = src.text[row.char_start:row.char_end]
        q, c = features.in_double_quotes(doc), features.column(doc)
        for m in re.finditer(r"\S+", doc):
            f.append(q[m.end() - 1])
            col.append(c[m.end() - 1])
            held.append(row["name"] in tab.attrs["heldout_documents"])
        x.append(np.asarray(src.arrays["rnn.l0.h"][row.step_start + 1:row.step_end - 1], np.float64))
    x, f, col, held = np.concatenate(x), np.array(f), np.array(col), np.array(held)
    t = tab.set_index(["unit", "feature"])
    for u in range(6):
        r = stats.rankdata(x[held, u])
        y = f[held]
        auc = (r[y == 1].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (len(y) - y.sum()))
        row = t.loc[(f"rnn.l0.h:{u}", "in_double_quotes")]
        assert (auc if row["direction"] > 0 else 1 - auc) == pytest.approx(row["heldout_score"], abs=2e-3)
        row = t.loc[(f"rnn.l0.h:{u}", "column")]
        assert row["heldout_score"] == pytest.approx(np.corrcoef(x[held, u], col[held])[0, 1], abs=1e-5)
    best = t.xs("in_double_quotes", level="feature").sort_values("selection_strength").index[-1]
    assert best == "rnn.l0.h:0" and t.loc[(best, "in_double_quotes"), "heldout_q"] < 1e-3
    assert np.isfinite(t.loc[(best, "in_double_quotes"), "selectivity"])


def test_a_feature_constant_in_each_document_has_no_null_spread():
    """Only a within-document shift leaves a per-document feature where it was: every shift of the
    held-out part then scores what was observed (a shift across a boundary would spread the null)."""
    docs = {f"d{i}": "w " * (120 + 10 * i) for i in range(8)}

    def arrays(src):
        rng = np.random.default_rng(0)
        return {"rnn.l0.h": (rng.normal(size=(src.steps, 3)) + src.step_document[:, None] % 3).astype(np.float32)}
    src = word_source(docs, arrays)
    doc_level = on_tokens(lambda toks: (src.step_document % 3).astype(float))
    tab = find_neurons(src, {"doc_level": doc_level}, heldout=0.4, select=3, progress=False)
    assert len(tab.attrs["heldout_documents"]) >= 3
    assert (tab["heldout_null_std"] < 1e-9).all()
    assert np.allclose(tab["heldout_null_mean"], tab["heldout_score"], atol=1e-9)
    held = tab.attrs["heldout_documents"]
    segs = split_steps(src, 0.4).segments[1]
    assert len(segs) == len(held)


def test_within_document_null_keeps_alpha_where_a_crossing_one_does_not():
    """Null units follow their document's level (which goes with how often the feature holds in it)
    but not the feature step by step: about 5% are significant against within-document shifts,
    most against shifts of the whole part, which break the document-level alignment."""
    rng = np.random.default_rng(3)
    D, L, U = 10, 300, 300
    rate = rng.uniform(0.1, 0.6, D)
    f = np.zeros(D * L)
    for d in range(D):                       # runs of the feature, each document at its own rate
        on = rng.random() < rate[d]
        for t in range(L):
            on = (rng.random() < 1 - 0.05 * (1 - rate[d]) / max(rate[d], 0.05)) if on else rng.random() < 0.05
            f[d * L + t] = on
    ar = np.zeros((D * L, U))
    e = rng.normal(size=ar.shape)
    for t in range(1, D * L):
        ar[t] = 0.9 * ar[t - 1] + e[t] * np.sqrt(1 - 0.81)
    h = ar + 4.0 * np.repeat(rate - rate.mean(), L)[:, None]
    src = word_source({f"d{d}": "w " * L for d in range(D)}, bos=False)
    src.arrays["rnn.l0.h"] = h.astype(np.float32)
    tab = find_neurons(src, {"feat": on_tokens(lambda toks: f)}, heldout=0.3, select=U, progress=False)
    assert 0.01 < (tab["heldout_p"] < 0.05).mean() < 0.1
    assert 0.01 < (tab["heldout_p_empirical"] < 0.05).mean() < 0.1
    sp = split_steps(src, 0.3)
    crossing = [resolved_test(h[sp.rows[sp.at:], u].astype(np.float32), f[sp.rows[sp.at:]], True, 1)["p"]
                for u in range(0, U, 10)]
    assert (np.array(crossing) < 0.05).mean() > 0.5


def test_controls_pair_the_previous_token_with_the_current_one():
    """On words the control is a lookup on (previous word, word): it knows "the previous word was b"
    exactly (a character pair, a space and a letter, could not), and not "two words back"."""
    rng = np.random.default_rng(0)
    docs = {f"d{i}": " ".join(rng.choice(["a", "b", "c"], 150)) + "\n" for i in range(6)}
    src = word_source(docs, lambda src: {"rnn.l0.h": rng.normal(size=(src.steps, 2)).astype(np.float32)})
    doc = src.step_document

    def back(k):
        def fn(toks):
            t = np.array(toks, dtype=object)
            out = np.zeros(len(t))
            same = doc[k:] == doc[:-k]
            out[k:] = (t[:-k] == "b") & same
            return out
        return on_tokens(fn)
    tab = find_neurons(src, {"after_b": back(1), "two_after_b": back(2)}, shifts=4, progress=False)
    ctl = tab.groupby("feature")["control_score"].first()
    assert ctl["after_b"] == 1.0
    assert abs(ctl["two_after_b"] - 0.5) < 0.1
    assert tab["selectivity"].notna().all()


def test_contexts_stay_inside_the_document_and_point_at_the_token():
    src = planted(n_docs=3, words=60)
    ctx = top_contexts(src, k=5, window=12, progress=False)
    doc = src.step_document
    tokens = src.tokens()
    for r in ctx.itertuples():
        assert src.has_text[r.step]                                  # BOS/EOS (1e4) never ranked
        assert doc[r.start] == doc[r.step] == doc[r.start + len(r.values) - 1]
        assert r.context[r.token_start:r.token_end] == tokens[r.step]
        assert r.values[r.offset] == pytest.approx(r.value)
        a = src.spans[r.start:r.start + len(r.values)]
        a = a[a[:, 0] >= 0]
        assert r.context == src.text[a[0, 0]:a[-1, 1]] and r.char_start == a[0, 0]


def test_sparse_probe_and_patterns_and_decay_windows_on_steps():
    src = planted(n_docs=6, words=200)
    path = sparse_probe(src, "in_double_quotes", heldout=0.3)
    assert path["units"].iloc[1] == "rnn.l0.h:0" and path["heldout_score"].max() > 0.75
    x = np.asarray(src.arrays["rnn.l0.h"][:40], np.float64)
    got = span_scores(x, 5, 15, src.has_text[:40])
    assert np.all(np.abs(got["inside"]) < 100)                     # the 1e4 BOS step is left out
    ends = decay_ends(src.step_bounds, 30)
    b = src.step_bounds[src.step_document[ends]]
    assert (ends - 29 >= b[:, 0]).all() and (ends + 1 < b[:, 1]).all()
    assert len(ends) == sum(max(0, e - s - 30) for s, e in src.step_bounds)


def test_analyze_a_word_level_run_of_several_documents(tmp_path):
    """A format 2 Run on disk (words, BOS/EOS, 6 documents) through ``analyze``: the tables come out
    on steps, equal to the in-memory Source's, with whole documents held out."""
    from rnnscope import store
    from rnnscope.analysis.report import analyze, read_table
    from rnnscope.probe import open_run
    src = planted(n_docs=6, words=200)
    h = np.asarray(src.arrays["rnn.l0.h"])
    d = src.documents
    docs = store.documents_frame(d["name"], np.r_[d["char_start"], d["char_end"].iloc[-1]],
                                 np.r_[d["step_start"], d["step_end"].iloc[-1]])
    with store.RunWriter(tmp_path / "run", src.text, spans=src.spans, documents=docs, dtype="float32",
                         log=lambda s: None) as w:
        w.states("rnn.l0.h", 6).write(0, h)
        w.units(pd.DataFrame([{"unit": f"rnn.l0.h:{i}", "key": "rnn.l0.h", "index": i, "module": "rnn", "layer": 0,
                               "reverse": False, "kind": "h", "mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0}
                              for i in range(6)]))
        w.commit({"model": {"checksum": "0" * 64}, "vocab": None, "unk": None, "loss": None,
                  "keys": {"rnn.l0.h": {"units": 6, "nonfinite": 0, "overflow": 0}}})
    run = open_run(tmp_path / "run")
    out = analyze(run, features=["in_double_quotes", "column"], language=None, shifts=4, decay=False,
                  contexts=3, context_window=8, progress=False, log=lambda s: None)
    neurons = read_table(run, "neurons")
    direct = find_neurons(src, ["in_double_quotes", "column"], language=None, shifts=4, progress=False)
    assert neurons["heldout_score"].to_numpy() == pytest.approx(direct["heldout_score"].to_numpy(), abs=1e-12)
    assert out["neurons"].attrs["heldout_documents"] == ["doc4", "doc5"]
    assert out["summary"]["neuron_tests"]["scored_steps"] == 6 * 200
    top = neurons[neurons["feature"] == "in_double_quotes"].iloc[0]
    assert top["unit"] == "rnn.l0.h:0" and top["heldout_q"] < 1e-3
    ctx = read_table(run, "contexts")
    assert (ctx["context"].str.len() > 0).all() and src.has_text[ctx["step"]].all()


def test_printed_contexts_bracket_the_whole_token():
    from rnnscope.analysis.report import unit_contexts
    src = word_source({"a": "one two three four five six seven\n"},
                      lambda s: {"rnn.l0.h": np.arange(s.steps, dtype=np.float32)[:, None]})
    printed = unit_contexts(top_contexts(src, k=1, window=4, progress=False), "rnn.l0.h:0")
    assert "five six [seven]" in printed and "[one]" in printed        # top: the last word; bottom: the first


def test_analyze_a_recorded_word_language_model_over_documents(tmp_path):
    """record() of a word LSTM LM (BOS/EOS, state reset per document), then analyze: the neuron
    table scores exactly the word steps, holds out whole documents, and every context and decay
    window stays inside one document."""
    import torch
    from rnnscope import probe
    from rnnscope.analysis.gradflow import gradient_decay
    from rnnscope.analysis.report import analyze
    from test_documents import WordLM
    from test_encoders import WordTokenizer
    text = open("zoo/samples/shakespeare.txt").read()[:12000]
    docs = {f"part{i}": text[i * 2000:(i + 1) * 2000] for i in range(6)}
    tok = WordTokenizer(text)
    model = WordLM(len(tok.words), size=8)
    run = probe.record(model, docs, tmp_path / "run", encode=tok, dtype="float32", progress=False)
    out = analyze(run, features=["in_single_quotes", "column", "indent"], language=None, shifts=4, decay=False,
                  contexts=2, context_window=6, progress=False, log=lambda s: None)
    n = out["neurons"]
    assert n.attrs["scored_steps"] == int(run.has_text.sum()) < len(run)
    assert n.attrs["selection_documents"] + n.attrs["heldout_documents"] == list(docs)
    assert len(n.attrs["heldout_documents"]) == 2
    col = n[n["feature"] == "column"]
    assert col["heldout_score"].notna().all() and col["control_score"].notna().all()
    ctx = out["contexts"]
    doc = run.step_document
    assert (doc[ctx["start"]] == doc[ctx["step"]]).all() and run.has_text[ctx["step"]].all()
    bounds = run.documents[["step_start", "step_end"]].to_numpy()
    ids = torch.as_tensor(np.asarray(run.ids))[None]
    curve = gradient_decay(model, ids, positions=16, max_lag=20, warmup=5, progress=False, documents=bounds)
    assert set(curve["lag"]) == set(range(21)) and (curve["positions"] == 16).all()
