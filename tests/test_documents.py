"""record over many documents: word steps with BOS/EOS, the state reset at each document (or carried),
loss auto / None / the user's, gradients against a float64 autograd reference, corpora read from disk."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rnnscope import probe
from rnnscope.errors import RnnscopeError
from rnnscope.probe import read_documents
from reference import unrolled
from test_encoders import SubwordTokenizer, WordTokenizer

DOCS = {"a.txt": "the cat sat on the mat\n", "b.txt": "a dog ran\n", "c.txt": "the dog sat"}
TOK = WordTokenizer(" ".join(DOCS.values()))


class WordLM(nn.Module):
    """The word_language_model shape: embedding, 2-layer LSTM, decoder tied to the embedding."""

    def __init__(self, vocab: int, size: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder, self.rnn = nn.Embedding(vocab, size), nn.LSTM(size, size, 2, batch_first=True)
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, ids):
        return self.decoder(self.rnn(self.encoder(ids))[0])


class Tagger(nn.Module):
    """A char GRU tagger with a 2-way output per step: not next-token logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.gru, self.head = nn.Embedding(128, 5), nn.GRU(5, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, ids):
        return self.head(self.gru(self.emb(ids))[0])


def char_ids(text):
    return torch.tensor([ord(c) % 128 for c in text])


def word_reference(model, ids, bounds, carry):
    """float64 states and grad_h / grad_c of the summed next-token loss within documents."""
    pieces = [(0, len(ids))] if carry else bounds
    doc = np.repeat(np.arange(len(bounds)), [b - a for a, b in bounds])
    keys, total, parts = {}, 0, []
    for a, b in pieces:
        x = model.encoder(ids[a:b])[None].double().detach()
        out, st, deltas = unrolled(model.rnn, x, perturb=True)
        logits = out[0] @ model.decoder.weight.double().T + model.decoder.bias.double()
        same = torch.from_numpy(doc[a + 1:b] == doc[a:b - 1])
        ce = F.cross_entropy(logits[:-1], ids[a + 1:b], reduction="none")
        total = total + (ce * same).sum()
        parts.append((st, deltas))
    total.backward()
    for layer in range(2):
        for kind in "hc":
            keys[f"rnn.l{layer}.{kind}"] = torch.cat([st[(layer, False, kind)][0] for st, _ in parts]).detach()
            keys[f"rnn.l{layer}.grad_{kind}"] = torch.cat([d[(layer, False, kind)].grad[0] for _, d in parts])
    return {k: v.numpy() for k, v in keys.items()}


@pytest.mark.parametrize("carry", [False, True], ids=["reset", "carry"])
def test_word_documents_with_bos_eos_equal_the_float64_reference(tmp_path, carry):
    model = WordLM(len(TOK.words))
    run = probe.record(model, DOCS, tmp_path / "r", encode=TOK, grad=True, carry=carry, chunk=3, horizon=100,
                       dtype="float32", progress=False)
    m = run.manifest
    assert len(run) == 18 == m["steps"] and m["documents"] == 3 and m["carry"] is carry
    assert m["encoder"] == {"kind": "spans", "name": "WordTokenizer"} and m["loss"]["kind"] == "next-token"
    assert run.text == "".join(DOCS.values()) and list(run.documents.name) == list(DOCS)
    assert run.tokens(0, 4) == ["", "the", "cat", "sat"] and run.tokens(7, 10) == ["", "", "a"]
    np.testing.assert_array_equal(run.step_document, [0] * 8 + [1] * 5 + [2] * 5)
    ids = torch.cat([TOK.encode(t)[0] for t in DOCS.values()])
    np.testing.assert_array_equal(run.ids, ids.numpy())
    bounds = list(zip(run.documents.step_start, run.documents.step_end))
    ref = word_reference(model, ids, bounds, carry)
    for key, want in ref.items():
        np.testing.assert_allclose(run[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    with torch.no_grad():       # the loss: next token within each document; NaN at each document's last step
        logits = torch.cat([model(ids[None, a:b])[0] for a, b in bounds]) if not carry else model(ids[None])[0]
    ce = F.cross_entropy(logits[:-1], ids[1:], reduction="none").numpy()
    last = np.array([b - 1 for _, b in bounds])
    assert np.isnan(run.loss[last]).all()
    keep = np.setdiff1d(np.arange(17), last)
    np.testing.assert_allclose(run.loss[keep], ce[keep], rtol=1e-5)
    assert m["loss"]["mean_nats"] == pytest.approx(float(ce[keep].mean()), rel=1e-5)


def test_reset_documents_differ_from_carrying_and_the_gradient_stops_at_a_document_end(tmp_path):
    model = WordLM(len(TOK.words))
    kw = dict(encode=TOK, grad=True, chunk=4, horizon=100, dtype="float32", progress=False)
    reset = probe.record(model, DOCS, tmp_path / "a", **kw)
    carried = probe.record(model, DOCS, tmp_path / "b", carry=True, **kw)
    np.testing.assert_array_equal(reset["rnn.l1.h"][:8], carried["rnn.l1.h"][:8])        # the first document
    assert np.abs(reset["rnn.l1.h"][8:] - carried["rnn.l1.h"][8:]).max() > 1e-3
    # the last document's loss reaches back into the first only when the state is carried
    assert np.abs(reset["rnn.l0.grad_c"][:8] - carried["rnn.l0.grad_c"][:8]).max() > 1e-6


def test_a_subword_tokenizer_with_offsets_records_steps_over_its_spans(tmp_path):
    tok = SubwordTokenizer()
    model = WordLM(len(tok.pieces), seed=2)
    run = probe.record(model, ["the cat", "a rat"], tmp_path / "r", encode=tok, chunk=2, dtype="float32",
                       progress=False)
    assert run.tokens() == ["", "the", " ", "c", "at", "", "", "a", " ", "r", "at", ""]
    np.testing.assert_array_equal(run.spans[6:9], [[-1, -1], [7, 8], [8, 9]])
    assert run.manifest["encoder"]["name"] == "toy-subword" and list(run.documents.name) == ["0", "1"]
    np.testing.assert_array_equal(run.per_step(np.arange(12.0))[[1, 4, 5]], [2.0, 6.0, np.nan])


def test_a_head_that_is_not_next_token_logits_records_states_only(tmp_path, capsys):
    texts = {"x": "hello", "y": "world!"}
    run = probe.record(Tagger(), texts, tmp_path / "r", encode=char_ids, chunk=4, progress=False)
    assert "the model's output is [1, T, 2], not next-token logits" in capsys.readouterr().out
    assert run.loss is None and run.manifest["loss"] is None and run.manifest["encoder"]["kind"] == "char"
    with torch.no_grad():
        m = Tagger()
        want = torch.cat([unrolled(m.gru, m.emb(char_ids(t))[None])[1][(0, False, "h")][0] for t in texts.values()])
    np.testing.assert_allclose(run["gru.l0.h"], want.numpy(), atol=2e-3)           # float16 on disk
    with pytest.raises(RnnscopeError, match=r"the model's output is \[1, T, 2\], not next-token logits — pass "
                                            r"--loss none, or --loss file.py:fn") as err:
        probe.record(Tagger(), texts, tmp_path / "g", encode=char_ids, grad=True, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "g").exists()


def test_gradients_of_a_user_loss_per_step_equal_autograd(tmp_path):
    def loss(output, ids):          # the tagger's log-probability of class 1 at each step
        return -output[0].float().log_softmax(-1)[:, 1]
    texts = ["ab c", "de"]
    run = probe.record(Tagger(), texts, tmp_path / "r", encode=char_ids, loss=loss, grad=True, chunk=3,
                       horizon=10, dtype="float32", progress=False)
    m = Tagger()
    for (a, b), text in zip([(0, 4), (4, 6)], texts):
        _, st, deltas = unrolled(m.gru, m.emb(char_ids(text))[None].double().detach(), perturb=True)
        h = st[(0, False, "h")][0]
        logits = h @ m.head.weight.double().T + m.head.bias.double()
        (-logits.log_softmax(-1)[:, 1]).sum().backward()
        np.testing.assert_allclose(run["gru.l0.grad_h"][a:b], deltas[(0, False, "h")].grad[0].numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(run.loss[a:b], (-logits.log_softmax(-1)[:, 1]).detach().numpy(), rtol=1e-5)
    assert run.manifest["loss"]["kind"] == "user"


def test_a_scalar_user_loss_needs_each_document_in_one_chunk(tmp_path):
    def pooled(output, ids):
        return output[0, -1, 0]
    run = probe.record(Tagger(), ["abc", "de"], tmp_path / "r", encode=char_ids, loss=pooled, grad=True,
                       dtype="float32", progress=False)
    assert np.isnan(run.loss).all() and run.manifest["loss"]["kind"] == "user"
    with torch.no_grad():
        m = Tagger()
        want = np.mean([float(m(char_ids(t)[None])[0, -1, 0]) for t in ("abc", "de")])
    assert run.manifest["loss"]["mean_nats"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(RnnscopeError, match=r"scalar for steps 0..1, which are not one whole document.*--chunk 3"):
        probe.record(Tagger(), ["abc", "de"], tmp_path / "s", encode=char_ids, loss=pooled, chunk=2,
                     progress=False)
    assert not (tmp_path / "s").exists()


BAD = {
    "a loss of the wrong shape": (dict(loss=lambda o, i: o[0, :-1, 0]), r"loss returned shape \[1\] for 2 steps"),
    "a loss that fails": (dict(loss=lambda o, i: o[5]), r"loss failed on the model's output \[1, T, 2\].*IndexError"),
    "an empty document": (dict(texts=["ab", ""]), r"document '1' is empty"),
    "mismatched ids and spans": (dict(encode=lambda s: ([1, 2], [(0, 1)])), r"document '0': .*2 ids but 1 spans"),
    "spans out of order": (dict(encode=lambda s: ([1, 2], [(1, 2), (0, 1)])), r"\(0, 1\) at step 1 goes back"),
    "no loss with gradients": (dict(loss=None, grad=True), r"gradients need a loss"),
    "an unknown module": (dict(modules=["rnn"]), r"no recurrent module named 'rnn'.*choose --modules from 'gru'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_documents_encoders_and_losses_are_one_line_and_nothing_written(tmp_path, case):
    kw, message = BAD[case]
    kw = {"texts": ["ab", "cd"], "encode": char_ids, **kw}
    with pytest.raises(RnnscopeError, match=message) as err:
        probe.record(Tagger(), kw.pop("texts"), tmp_path / "r", chunk=2, progress=False, **kw)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def test_modules_chooses_what_is_recorded(tmp_path):
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.enc, self.dec = nn.Embedding(128, 4), nn.GRU(4, 5, batch_first=True), nn.GRU(5, 3)

        def forward(self, ids):
            return self.dec(self.enc(self.emb(ids))[0].transpose(0, 1))[0]
    run = probe.record(EncDec(), "abcd", tmp_path / "r", encode=char_ids, modules=["dec"], progress=False)
    assert run.keys() == ["dec.l0.h", "dec.l0.r", "dec.l0.z", "dec.l0.n"] and run.manifest["modules"] == ["dec"]


def test_progress_counts_steps_across_documents(tmp_path, capsys):
    probe.record(Tagger(), ["abc", "defg"], tmp_path / "r", encode=char_ids, loss=None, chunk=2)
    err = capsys.readouterr().err
    assert "7.00/7.00" in err and "step/s" in err


def test_read_documents_from_a_directory_a_jsonl_and_a_file(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_bytes(b"second\r\n")
    (root / "a.txt").write_text("first")
    (root / "sub" / "c.txt").write_text("third")
    (root / ".hidden").write_text("no")
    (tmp_path / "outside.txt").write_text("never")
    os.symlink(tmp_path / "outside.txt", root / "link.txt")
    os.mkfifo(root / "fifo")
    docs = read_documents(root)
    assert docs.names == ["a.txt", "b.txt", "sub/c.txt"] and docs.texts == ["first", "second\r\n", "third"]
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps({"text": "one", "name": "x"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = read_documents(lines)
    assert list(docs) == [("x", "one"), ("d.jsonl#1", "two")]          # counted from 0, as --document N
    assert list(read_documents(root / "a.txt")) == [("a.txt", "first")]
    lines.write_text('{"name": "x"}\n')
    with pytest.raises(RnnscopeError, match=r"d.jsonl line 1 has no \"text\" string"):
        read_documents(lines)
    with pytest.raises(RnnscopeError, match="not a regular file"):
        read_documents(root / "fifo")
    run = probe.record(Tagger(), read_documents(root), tmp_path / "r", encode=char_ids, progress=False)
    assert run.text == "firstsecond\r\nthird" and run.documents.char_end.tolist() == [5, 13, 18]


def test_a_byte_level_model_records_non_ascii_text_with_several_steps_per_character(tmp_path):
    def utf8(text):
        spans = [(i, i + 1) for i, c in enumerate(text) for _ in c.encode()]
        return torch.tensor(list(text.encode())) % 128, spans
    run = probe.record(Tagger(), ["é€", "ab"], tmp_path / "r", encode=utf8, chunk=2, progress=False)
    assert len(run) == 7 and run.chars == 4 and run.manifest["encoder"]["kind"] == "spans"
    assert run.tokens() == ["é", "é", "€", "€", "€", "a", "b"]
    np.testing.assert_array_equal(run.per_step(np.array([10.0, 20.0, 30.0, 40.0])), [10, 10, 20, 20, 20, 30, 40])


def test_a_call_that_passes_its_own_initial_state_is_refused_when_chunks_must_carry(tmp_path):
    """word_language_model passes init_hidden() zeros every call: chunks would silently restart from zero."""
    model = WordLM(len(TOK.words))

    def call(m, ids):
        zeros = torch.zeros(2, 1, 8)
        return m.decoder(m.rnn(m.encoder(ids), (zeros, zeros))[0])
    text = " ".join(DOCS.values())
    with pytest.raises(RnnscopeError, match="passes its own initial state to rnn"):
        probe.record(probe.Subject(model, TOK, call=call), text, tmp_path / "run", chunk=3, progress=False)
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())
    run = probe.record(probe.Subject(model, TOK, call=call), text, tmp_path / "run", chunk=10 ** 6, progress=False)
    assert len(run) == len(TOK.encode(text)[0])         # one chunk: the caller's zeros are its start


def test_documents_count_from_0_in_their_names_the_picker_the_text_view_and_export(tmp_path, capsys):
    """Document N is row N, `--document N`, the picker's `N: name`, the text view's label, and the N of
    an unnamed .jsonl line's name (a line number counted from 1, and counted the blank line)."""
    from rnnscope.cli import main
    from rnnscope.dashboards.picker import document_options
    from rnnscope.dashboards.queries import page_label
    from rnnscope.dashboards.steps import Documents
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps({"text": "one", "name": "intro"}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
                     + json.dumps({"text": "three"}) + "\n")
    run = probe.record(Tagger(), read_documents(lines), tmp_path / "r", encode=char_ids, loss=None, progress=False)
    assert list(run.documents.name) == ["intro", "c.jsonl#1", "c.jsonl#2"]
    docs = Documents(run.documents)
    assert [label for _, label in document_options(docs)] == ["0: intro", "1: c.jsonl#1", "2: c.jsonl#2"]
    for n, name in enumerate(run.documents.name):
        assert docs.find(str(n)) == docs.find(name) == docs.find(f"#{n}") == n
        assert f"document <b>{n}: {name}</b> (of 0&ndash;2)" in page_label("steps", 0, 1, len(run), docs, n)
        assert docs.search(f"#{n}").tolist() == [n]
    assert main(["export", str(run.path), "--unit", "gru.l0.h:1", "--document", "2", "--out",
                 str(tmp_path / "2.html")]) == 0
    assert "document c.jsonl#2" in capsys.readouterr().out + (tmp_path / "2.html").read_text()
    # names that are numbers but not their documents' indices: a number is never guessed
    numbered = Documents(pd.DataFrame({"name": ["1", "0", "x"], "char_start": [0, 2, 4], "char_end": [2, 4, 6],
                                       "step_start": [0, 2, 4], "step_end": [2, 4, 6]}))
    assert numbered.find("#1") == numbered.find(1) == 1 and numbered.find("#0") == numbered.find(np.int64(0)) == 0
    assert numbered.find("2") == 2 and numbered.find("x") == 2
    for text, named, index in (("1", 0, 1), ("0", 1, 0)):
        with pytest.raises(RnnscopeError, match=f"document '{text}' is ambiguous: document {named} is named "
                                                f"'{text}', and {text} is also the index of document {index}") as err:
            numbered.find(text)
        assert f"give '#{index}' for document {index}, or '#{named}' for the one named '{text}'" in str(err.value)
        assert "\n" not in str(err.value)


def test_the_pickers_title_counts_documents_as_its_labels_do():
    from rnnscope.dashboards.picker import DocumentPicker
    from rnnscope.dashboards.steps import Documents
    names = [f"r{i}" for i in range(250)]
    docs = Documents(pd.DataFrame({"name": names, "char_start": 0, "char_end": 1, "step_start": 0, "step_end": 1}))
    picked = []
    picker = DocumentPicker(docs, 0, picked.append)
    assert picker.select.title == "document (0-99 of 250)" and picker.select.options[0] == ("0", "0: r0")
    picker._turn(+100)
    assert picker.select.title == "document (100-199 of 250)" and picker.select.options[1] == ("100", "100: r100")
    picker._find("r1")                       # r1, r10-r19, r100-r199: 111 matches
    assert picker.select.title == "document (111 matches, page 1 of 2)"
    picker._find("#7")
    assert picker.select.title == "document (1 match)" and picker.select.options[-1] == ("7", "7: r7")
    picker._chosen("7")
    assert picked == [7]
