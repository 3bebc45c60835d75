"""The user's own model, recorded right or refused: modules that run another number of steps than the
text, gradients that survive storage, a document's fields reaching the user's call and loss, the chunk
a bidirectional model needs, and word-level traces in memory. Models are built and trained here."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rnnscope.probe as probe        # the package (main fixed in 8d83309 a lazy lookup that gave probe/probe.py)
from rnnscope.errors import RnnscopeError
from rnnscope.store import open_run

V = 32


def char_ids(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) % (V - 1) + 1 for c in text])         # 0 is the decoder's SOS


class Seq2Seq(nn.Module):
    """A GRU encoder and a GRU decoder. ``mode``: "teacher" feeds SOS + the ids (n + 1 steps for n),
    "free" runs ``free_steps`` steps of its own, "capped" at most ``cap`` steps (a max-length decoder)."""

    def __init__(self, mode: str, free_steps: int = 12, cap: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.free_steps, self.cap = mode, free_steps, cap
        self.emb = nn.Embedding(V, 6)
        self.encoder, self.decoder = nn.GRU(6, 8, batch_first=True), nn.GRU(6, 8, batch_first=True)
        self.out = nn.Linear(8, V)

    def forward(self, ids):
        _, h = self.encoder(self.emb(ids))
        if self.mode == "teacher":
            dec_in = torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)
        elif self.mode == "free":
            dec_in = torch.zeros(ids.shape[0], self.free_steps, dtype=torch.long)
        else:
            dec_in = ids[:, : self.cap]
        y, _ = self.decoder(self.emb(dec_in), h)
        return self.out(y)


# 1. never a wrong Run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, got, want", [("teacher", "3 steps", "2 steps"), ("free", "12 steps", "2 steps"),
                                             ("capped", "8 steps", "9 steps")])
def test_a_module_on_other_steps_than_the_text_is_refused_naming_it_and_both_counts(tmp_path, mode, got, want):
    model = Seq2Seq(mode)
    sub = probe.Subject(model, char_ids, loss=None)
    with pytest.raises(RnnscopeError) as err:
        probe.record(sub, {"a": "abcdefghi", "b": "xyz"}, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "'decoder'" in msg and f"ran {got}" in msg and f"gave {want}" in msg and "--modules encoder" in msg
    assert "\n" not in msg and not (tmp_path / "run").exists()
    # the modules on the text's steps are still recorded, and equal the module's own outputs
    run = probe.record(sub, {"a": "abcdefghi", "b": "xyz"}, tmp_path / "run", modules=["encoder"],
                       dtype="float32", progress=False)
    assert run.keys() == ["encoder.l0.h", "encoder.l0.r", "encoder.l0.z", "encoder.l0.n"] or \
        set(run.keys()) == {"encoder.l0.h", "encoder.l0.r", "encoder.l0.z", "encoder.l0.n"}
    with torch.no_grad():
        want_h = model.encoder(model.emb(char_ids("abcdefghi")[None]))[0][0].numpy()
    np.testing.assert_allclose(run["encoder.l0.h"][:9], want_h, rtol=1e-5, atol=1e-6)


def test_a_user_loss_of_the_wrong_length_is_refused(tmp_path):
    """The loss's length is checked against the steps it was given (a decoder's n + 1 losses for n)."""
    model = Seq2Seq("teacher")

    def loss(output, ids):
        return F.cross_entropy(output[0].float(), torch.cat([ids, ids[:1]]), reduction="none")

    with pytest.raises(RnnscopeError, match=r"loss returned shape \[10\] for 9 steps"):
        probe.record(probe.Subject(model, char_ids, loss=loss, modules=["encoder"]), "abcdefghi", tmp_path / "r",
                     grad=True, progress=False)


# 2. gradients that survive storage ----------------------------------------------------------------------

class Classifier(nn.Module):
    """An LSTM over a review, its label read at the last step: most steps' gradients are tiny."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.lstm, self.head = nn.Embedding(V, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


def reviews(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"r{i}": "".join(rng.choice(list("abcdefgh "), rng.integers(30, 60))) for i in range(n)}


def first_class(output, ids):
    return F.cross_entropy(output.float(), torch.tensor([1]))


def test_gradients_are_stored_so_that_none_becomes_zero_or_loses_float16_precision(tmp_path):
    model, docs = Classifier(), reviews(12)
    run = probe.record(probe.Subject(model, char_ids, loss=first_class), docs, tmp_path / "run", grad=True,
                       progress=False)
    assert run.manifest["keys"]["lstm.l0.h"]["dtype"] == "float16"            # states stay compact
    assert run.manifest["keys"]["lstm.l0.grad_h"]["dtype"] == "float32"
    assert run["lstm.l0.grad_h"].dtype == np.float32
    for name, text in docs.items():     # the in-memory probe of each document: the reference
        with probe.Probe(model, grad=True) as p:
            first_class(model(char_ids(text)[None]), None).backward()
        ref = p.trace["lstm.l0.grad_h"][0].numpy()
        doc = run.documents.set_index("name").loc[name]
        got = np.asarray(run["lstm.l0.grad_h"][doc.step_start:doc.step_end], np.float64)
        nz = ref != 0
        assert (np.abs(ref[nz]) < np.finfo(np.float16).tiny).any()          # float16 would have lost these
        assert (got[nz] != 0).all()
        np.testing.assert_allclose(got, ref, rtol=2.0 ** -11, atol=0)
    assert run.underflow == {} or not any(".grad_" in k for k in run.underflow)


def test_underflow_is_counted_in_the_manifest_and_said(tmp_path, capsys):
    model, docs = Classifier(), reviews(6)
    sub = probe.Subject(model, char_ids, loss=first_class)
    wide = probe.record(sub, docs, tmp_path / "wide", grad=True, progress=False)
    narrow = probe.record(sub, docs, tmp_path / "narrow", grad=True, grad_dtype="float16", progress=False)
    g = np.asarray(wide["lstm.l0.grad_h"])
    want = int(((g != 0) & (np.abs(g) < np.finfo(np.float16).tiny)).sum())
    assert want > 0 and narrow.manifest["keys"]["lstm.l0.grad_h"]["underflow"] == want
    assert narrow.underflow["lstm.l0.grad_h"] == want
    assert f"lstm.l0.grad_h has {want:,} non-zero values that became zero or subnormal in float16" \
        in capsys.readouterr().out
    reopened = open_run(tmp_path / "narrow")
    assert reopened["lstm.l0.grad_h"].dtype == np.float16 and reopened["lstm.l0.h"].dtype == np.float16


def test_a_run_written_before_keys_had_their_own_dtype_still_opens(tmp_path):
    model = Classifier()
    probe.record(probe.Subject(model, char_ids, loss=first_class), reviews(2), tmp_path / "run", grad=True,
                 dtype="float32", progress=False)
    path = tmp_path / "run" / "manifest.json"
    m = json.loads(path.read_text())
    for info in m["keys"].values():
        del info["dtype"], info["underflow"]
    path.write_text(json.dumps(m))
    run = open_run(tmp_path / "run")
    assert run["lstm.l0.grad_h"].dtype == np.float32 and run.underflow == {}
    m["keys"]["lstm.l0.grad_h"]["dtype"] = "float16"          # a key's own dtype is checked against its file
    path.write_text(json.dumps(m))
    with pytest.raises(RnnscopeError, match="holds float32, expected float16"):
        open_run(tmp_path / "run")


# 3. a document's fields reach the user's call and loss; a per-document loss is stored per document ------

def labelled(tmp_path, n: int = 8):
    rows = [{"name": f"review {i}", "text": t, "label": int(t.count("a") > t.count("b")), "stars": i % 5}
            for i, t in enumerate(reviews(n).values())]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def label_loss(output, ids, document):
    return F.cross_entropy(output.float(), torch.tensor([document["label"]]))


def test_a_documents_fields_reach_the_call_and_the_loss_and_the_loss_is_kept_per_document(tmp_path):
    path, rows = labelled(tmp_path)
    docs = probe.read_documents(path)
    assert docs.document(2) == {"name": "review 2", "text": rows[2]["text"], "label": rows[2]["label"], "stars": 2}
    model, seen = Classifier(), []

    def call(model, ids, *, document):
        seen.append((document["name"], document["stars"], ids.shape[-1]))
        return model(ids)

    run = probe.record(probe.Subject(model, char_ids, loss=label_loss, call=call), docs, tmp_path / "run",
                       grad=True, progress=False)
    assert [s[:2] for s in seen[1:]] == [(r["name"], r["stars"]) for r in rows]       # after the dry run
    assert [s[2] for s in seen[1:]] == [len(r["text"]) for r in rows]
    with torch.no_grad():
        want = [float(F.cross_entropy(model(char_ids(r["text"])[None]), torch.tensor([r["label"]]))) for r in rows]
    assert run.manifest["loss"]["per"] == "document" and run.document_loss.shape == (len(rows),)
    np.testing.assert_allclose(run.document_loss, want, rtol=1e-5)
    assert run.manifest["loss"]["mean_nats"] == pytest.approx(np.mean(want), rel=1e-5)
    # the label moves the gradient: the other label's loss gives another grad_h at the last step
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]
    other = probe.record(probe.Subject(model, char_ids, loss=label_loss), flipped, tmp_path / "other", grad=True,
                         progress=False)
    last = run.documents.step_end.to_numpy() - 1
    assert not np.allclose(run["lstm.l0.grad_h"][last], other["lstm.l0.grad_h"][last])
    assert probe.record(probe.Subject(model, char_ids, loss=label_loss), flipped, tmp_path / "steps",
                        progress=False).document_loss is not None
    # a call that passes its keywords on to the model is not given one it would hand on

    def passing_on(model, ids, **kwargs):
        return model(ids, **kwargs)

    probe.record(probe.Subject(model, char_ids, loss=None, call=passing_on), docs, tmp_path / "kw", progress=False)


def test_the_command_line_reports_a_per_document_loss_per_document(tmp_path, capsys):
    from rnnscope.cli import main
    path, rows = labelled(tmp_path, 4)
    spec = tmp_path / "classifier.py"
    spec.write_text(f'''
import torch
from torch import nn
from torch.nn import functional as F
from rnnscope.probe import Subject

class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.lstm, self.head = nn.Embedding({V}, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0][:, -1])

def encode(text):
    return torch.tensor([ord(c) % {V - 1} + 1 for c in text])

def loss(output, ids, document):
    return F.cross_entropy(output.float(), torch.tensor([document["label"]]))

def build():
    return Subject(Classifier(), encode, loss=loss)
''')
    assert main(["probe", "--model", f"{spec}:build", "--text", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    mean = open_run(tmp_path / "run").manifest["loss"]["mean_nats"]
    assert f"loss {mean:.4f} nats/document" in out and "nats/step" not in out


# 4. a bidirectional model gets the chunk it needs -------------------------------------------------------

class BiTagger(nn.Module):
    """A bidirectional char LSTM tagger (segmentation tags B/I) over ids with BOS and EOS steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.lstm = nn.Embedding(V, 6), nn.LSTM(6, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 2)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def bos_eos(text: str):
    """(ids, spans): BOS, one step per character, EOS; BOS and EOS read no text."""
    ids = torch.tensor([1] + [ord(c) % (V - 3) + 3 for c in text] + [2])
    spans = np.array([(-1, -1)] + [(i, i + 1) for i in range(len(text))] + [(-1, -1)], np.int64)
    return ids, spans


def test_a_bidirectional_model_reads_each_document_whole_by_default(tmp_path, capsys):
    long = "我们今天去北京看长城。" * 240                     # 2,640 characters: longer than the default chunk
    docs = {"short": "你好，世界。", "long": long}
    model = BiTagger()
    run = probe.record(probe.Subject(model, bos_eos, loss=None), docs, tmp_path / "run", dtype="float32",
                       progress=False)
    assert run.manifest["chunk"] == len(long) + 2
    assert "reads each document whole: one pass of up to 2,642 steps" in capsys.readouterr().out
    with torch.no_grad():           # the reverse direction at the first step has read the whole document
        want = model.lstm(model.emb(bos_eos(long)[0][None]))[0][0, :, 5:].numpy()
    doc = run.documents.set_index("name").loc["long"]
    np.testing.assert_allclose(run["lstm.l0_reverse.h"][doc.step_start:doc.step_end], want, rtol=1e-5, atol=1e-6)
    assert run.spans[doc.step_start].tolist() == [-1, -1] and run.spans[doc.step_end - 1].tolist() == [-1, -1]
    # asked for a smaller chunk, it is still refused; over the memory bound, refused naming the bound
    with pytest.raises(RnnscopeError, match="pass --chunk 2642"):
        probe.record(probe.Subject(model, bos_eos, loss=None), docs, tmp_path / "small", chunk=100, progress=False)
    with pytest.raises(RnnscopeError, match=r"'lstm' reads each document whole, and the longest \('long', "
                                            r"2,642 steps\) would hold about .* over the 0.00 GB bound"):
        probe.record(probe.Subject(model, bos_eos, loss=None), docs, tmp_path / "big", memory=1000, progress=False)
    assert not (tmp_path / "small").exists() and not (tmp_path / "big").exists()


# 5. find_neurons on an in-memory trace of a word-level model ---------------------------------------------

def test_find_neurons_takes_a_word_level_trace_in_memory_with_its_spans(tmp_path):
    from rnnscope.analysis import find_neurons
    from rnnscope.analysis.source import as_source
    from test_encoders import WordTokenizer
    rng = np.random.default_rng(3)
    words = ["the", "cat", "sat", "on", "a", "mat", "(", ")", "dog", "ran"]
    text = " ".join(rng.choice(words, 200))
    tok = WordTokenizer(text)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(len(tok.words), 6), nn.GRU(6, 8, batch_first=True))
    ids, spans = tok.encode(text)
    with torch.no_grad(), probe.Probe(model) as p:
        model(ids[None])
    assert p.trace["1.l0.h"].shape[1] == len(spans) != len(text)
    features = {"long_word": lambda t: np.array([c.isalpha() for c in t], float)}
    with pytest.raises(RnnscopeError, match="spans="):
        find_neurons(p.trace, features, text=text, progress=False)
    table = find_neurons(as_source(p.trace, text=text, spans=spans), features, progress=False)
    # the same trace written as a Run (the store's step layout) gives the same table
    run = probe.record(probe.Subject(model, tok, loss=None), text, tmp_path / "run", dtype="float32", progress=False)
    on_disk = find_neurons(run, features, progress=False)
    cols = ["unit", "feature", "selection_score"]
    mem, disk = (t[cols].sort_values(cols[:2]).reset_index(drop=True) for t in (table, on_disk))
    assert (mem["unit"] == disk["unit"]).all() and len(mem) == len(disk) == 32      # h r z n, 8 units each
    np.testing.assert_allclose(mem["selection_score"], disk["selection_score"], rtol=1e-4)
    with pytest.raises(RnnscopeError, match="pass the spans the encoder gave"):
        as_source(p.trace, text=text, spans=spans[::-1].copy())


# 6. the model kinds, probe -> analyze, nothing silently wrong -----------------------------------
# (the fourth, this classifier written as a loop over nn.LSTMCell: tests/test_own_cell_classifier.py)

FEATURES = """
import unicodedata
import numpy as np

def features():
    return {"letter_a": lambda s: np.array([c == "a" for c in s], float),
            "wide": lambda s: np.array([unicodedata.east_asian_width(c) in "WF" for c in s], float)}
"""


@pytest.fixture
def page(request):
    """A browser for the served page, or None where Chromium is missing (the rest still runs)."""
    import shutil
    return request.getfixturevalue("driver") if shutil.which("chromedriver") else None


def analyzed(run_path, capsys, page=None) -> "pd.DataFrame":
    """``rnnscope analyze RUN`` as a user runs it, on two language-free features and two of the user's own
    from a file; its neuron table, checked against the Run it was written into; the user's feature
    exported (its own row drawn from the Run) and listed by the served page in a real browser."""
    import pandas as pd
    from rnnscope.cli import main
    feats = run_path.parent / "feats.py"
    feats.write_text(FEATURES)
    assert main(["analyze", str(run_path), "--features", f"column,to_line_end,{feats}:features", "--no-decay",
                 "--shifts", "4", "--contexts", "2"]) == 0
    said = capsys.readouterr()
    assert "Warning" not in said.err
    run = open_run(run_path)
    table = pd.read_parquet(run_path / "analysis" / "neurons.parquet")
    assert len(table) > 0 and set(table["key"]) <= set(run.keys())
    assert table["index"].max() < max(run.manifest["keys"][k]["units"] for k in run.keys())
    mine = [f for f in ("wide", "letter_a") if f in set(table["feature"])]
    assert mine and all(f"skipped feature {f}: constant" in said.out for f in {"wide", "letter_a"} - set(mine))
    out = run_path.parent / f"{mine[0]}.html"
    assert main(["export", str(run_path), "--feature", mine[0], "--top", "3", "--out", str(out)]) == 0
    assert f"feature {mine[0]}" in out.read_text()
    if page is not None:
        from browser import get, served, wait_for_model
        from test_dashboard import _errors, _open
        with served(run_path) as (url, _):
            _open(page, url)
            wait_for_model(page, "text_source", 90)
            wait_for_model(page, "feature_filter", 90)
            assert set(mine) <= set(get(page, "feature_filter", "options"))
            assert not _errors(page)
    return table


def test_a_bidirectional_chinese_tagger_with_bos_eos_goes_through_probe_and_analyze(tmp_path, capsys, page):
    docs = {f"d{i}": "我们今天去北京看长城。" * (3 + i) + "\n你好，世界。" for i in range(6)}
    run = probe.record(probe.Subject(BiTagger(), bos_eos, loss=None), docs, tmp_path / "run", progress=False)
    assert run.manifest["encoder"]["kind"] == "spans" and (run.spans[run.documents.step_start, 0] == -1).all()
    table = analyzed(tmp_path / "run", capsys, page)
    assert {"lstm.l0.h", "lstm.l0_reverse.h"} <= set(table["key"]) and "wide" in set(table["feature"])


class AttnSeq2Seq(nn.Module):
    """A GRU encoder and a GRU decoder stepping over the target with dot-product attention on the source."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(V, 8)
        self.encoder, self.decoder = nn.GRU(8, 8, batch_first=True), nn.GRU(16, 8, batch_first=True)
        self.out = nn.Linear(16, V)

    def forward(self, ids):
        src, h = self.encoder(self.emb(ids))
        prev, outs = torch.zeros_like(ids[:, :1]), []
        ctx = torch.zeros(ids.shape[0], 1, 8)
        for _ in range(ids.shape[1] + 1):          # SOS + target: one step more than the source
            y, h = self.decoder(torch.cat([self.emb(prev), ctx], -1), h)
            ctx = torch.softmax(y @ src.transpose(1, 2), -1) @ src
            logits = self.out(torch.cat([y, ctx], -1))
            outs.append(logits)
            prev = logits.argmax(-1)
        return torch.cat(outs, 1)


def test_a_gru_seq2seq_with_attention_records_its_encoder_and_refuses_its_decoder(tmp_path, capsys, page):
    docs = reviews(8, seed=5)
    sub = probe.Subject(AttnSeq2Seq(), char_ids, loss=None)
    with pytest.raises(RnnscopeError, match=r"'decoder' ran 3 steps where the encoder gave 2 steps"):
        probe.record(sub, docs, tmp_path / "run", progress=False)
    run = probe.record(sub, docs, tmp_path / "run", modules=["encoder"], progress=False)
    assert {k.split(".")[0] for k in run.keys()} == {"encoder"}
    analyzed(tmp_path / "run", capsys, page)


class PackedClassifier(nn.Module):
    """An LSTM classifier over a padded batch, packed to its lengths (batch 1 when probed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.emb, self.lstm, self.head = nn.Embedding(V, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 2)

    def forward(self, ids, lengths=None):
        lengths = torch.full((ids.shape[0],), ids.shape[1]) if lengths is None else lengths
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


def test_a_packed_lstm_classifier_over_many_short_reviews_goes_through_probe_and_analyze(tmp_path, capsys, page):
    rows = [{"text": t, "label": int(t.count("a") > t.count("b"))} for t in reviews(60, seed=6).values()]
    model = PackedClassifier()
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(2):                     # a few seconds of training on the labels
        for r in rows:
            loss = F.cross_entropy(model(char_ids(r["text"])[None]), torch.tensor([r["label"]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = probe.record(probe.Subject(model, char_ids, loss=label_loss), rows, tmp_path / "run", grad=True,
                       progress=False)
    assert run.manifest["documents"] == 60 and run.document_loss.shape == (60,)
    g = np.asarray(run["lstm.l0.grad_h"])
    assert run["lstm.l0.grad_h"].dtype == np.float32 and (g[run.documents.step_end - 1] != 0).all()
    with torch.no_grad():
        want = [float(F.cross_entropy(model(char_ids(r["text"])[None]), torch.tensor([r["label"]]))) for r in rows]
    np.testing.assert_allclose(run.document_loss, want, rtol=1e-5)
    analyzed(tmp_path / "run", capsys, page)
