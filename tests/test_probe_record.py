"""Runs on disk: streamed equals one pass, bad input is refused cleanly, nothing half-written."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rnnscope import probe
from rnnscope import zoo
from conftest import char_model
from rnnscope.probe import Probe, open_run
from rnnscope.zoo import RnnscopeError

TEXT = 'int main(void) {\n\tif (x) { puts("hi, (there)"); }\n\treturn 0;\n}\n' * 6


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_chunked_run_equals_one_pass(arch, tmp_path, tiny_vocab):
    ck = char_model(arch, tiny_vocab)
    run = probe.record(ck, TEXT, tmp_path / "r", chunk=29, dtype="float32", progress=False)
    ids = tiny_vocab.encode(TEXT)
    with Probe(ck.model) as p:
        logits = ck.model(ids)
    loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert run.text == TEXT and len(run) == len(TEXT)
    assert sorted(run.keys()) == sorted(p.trace)
    for key in run.keys():
        assert isinstance(run[key], np.memmap) and run[key].shape == (len(TEXT), p.trace[key].shape[-1])
        np.testing.assert_allclose(run[key], p.trace[key][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(run.loss[:-1], loss.detach().numpy(), atol=1e-5)
    assert np.isnan(run.loss[-1])                      # the last character has no next one
    u = run.units
    assert len(u) == sum(run[k].shape[1] for k in run.keys())
    for key in run.keys():          # per-unit statistics merged over 29-step chunks = over the whole text
        want = p.trace[key][0].double().numpy()
        rows = u[u.key == key].sort_values("index")
        for col, ref in (("mean", want.mean(0)), ("std", want.std(0)), ("min", want.min(0)), ("max", want.max(0))):
            np.testing.assert_allclose(rows[col].to_numpy(), ref, atol=1e-5, err_msg=f"{key} {col}")


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_chunked_gradients_with_full_horizon_equal_a_single_pass(arch, tmp_path, tiny_vocab):
    ck = char_model(arch, tiny_vocab)
    run = probe.record(ck, TEXT, tmp_path / "r", grad=True, chunk=41, horizon=len(TEXT), dtype="float32",
                       progress=False)
    ids = tiny_vocab.encode(TEXT)
    with Probe(ck.model, grad=True) as p:
        nn.functional.cross_entropy(ck.model(ids)[0, :-1], ids[0, 1:], reduction="sum").backward()
    for key in run.keys():
        np.testing.assert_allclose(run[key], p.trace[key][0].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    assert run.manifest["grad"] and run.manifest["grad_horizon"] == len(TEXT)


def test_a_short_horizon_truncates_only_far_contributions(tmp_path, tiny_vocab):
    """The last chunk sees every later loss whatever the horizon; elsewhere the error shrinks as it grows."""
    ck = char_model("lstm", tiny_vocab)
    full = np.asarray(probe.record(ck, TEXT, tmp_path / "a", grad=True, chunk=10_000, dtype="float32",
                                   progress=False)["rnn.l1.grad_h"])
    last_chunk = (len(TEXT) - 1) // 40 * 40
    errors = []
    for horizon in (1, 4, 30):
        g = np.asarray(probe.record(ck, TEXT, tmp_path / f"h{horizon}", grad=True, chunk=40, horizon=horizon,
                                    dtype="float32", progress=False)["rnn.l1.grad_h"])
        np.testing.assert_allclose(g[last_chunk:], full[last_chunk:], rtol=1e-5, atol=1e-6)
        errors.append(np.abs(g - full).max())
    assert errors[0] > 1e-4 and errors[0] > errors[1] > errors[2]


def test_float16_on_disk_and_manifest_identity(tmp_path, tiny_checkpoint):
    ck = zoo.load(tiny_checkpoint)
    run = probe.record(ck, TEXT, tmp_path / "r", kinds=["h", "c"], progress=False)
    assert run["rnn.l0.c"].dtype == np.float16 and sorted(run.keys()) == ["rnn.l0.c", "rnn.l0.h", "rnn.l1.c", "rnn.l1.h"]
    m = run.manifest
    assert m["model"]["weights_sha256"] == ck.card["weights_sha256"] and m["vocab"] == ck.vocab.chars
    assert m["model"]["checksum"] == probe.model_checksum(ck.model)
    assert m["model"]["modules"]["rnn"] == {"type": "LSTM", "layers": 2, "hidden": 16, "bidirectional": False,
                                            "proj_size": 0}


def test_any_module_with_a_caller_supplied_encoder(tmp_path):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.out = nn.Embedding(128, 6), nn.GRU(6, 7, batch_first=True), nn.Linear(7, 128)

        def forward(self, ids):
            return self.out(self.body(self.emb(ids))[0])
    run = probe.record(Tagger(), "hello world", tmp_path / "r", chunk=4, progress=False,
                       encode=lambda s: torch.tensor([[ord(c) for c in s]]))
    assert run["body.l0.z"].shape == (11, 7)


def test_out_of_vocabulary_text_names_characters_and_offers_unk(tmp_path, tiny_vocab):
    ck = char_model("gru", tiny_vocab)
    with pytest.raises(RnnscopeError, match=r"2 character\(s\) outside.*'Q' \(U\+0051\) at 3.*--unk"):
        probe.record(ck, "abcQdeé", tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    run = probe.record(ck, "abcQdeé", tmp_path / "r", unk="?" if "?" in tiny_vocab.chars else " ", progress=False)
    assert len(run) == 7 and run.text == "abcQdeé"


def test_unknown_kinds_are_refused(tmp_path, tiny_vocab):
    with pytest.raises(RnnscopeError, match="unknown state kind.*x.*choose from c, f, g, h, i, o"):
        probe.record(char_model("lstm", tiny_vocab), TEXT, tmp_path / "r", kinds=["h", "x"], progress=False)
    with pytest.raises(RnnscopeError, match="unknown state kind.*c.*choose from h, n, r, z"):
        probe.record(char_model("gru", tiny_vocab), TEXT, tmp_path / "r", kinds=["c"], progress=False)


def test_empty_text_and_existing_output(tmp_path, tiny_vocab):
    ck = char_model("rnn", tiny_vocab)
    with pytest.raises(RnnscopeError, match="text is empty"):
        probe.record(ck, "", tmp_path / "r", progress=False)
    (tmp_path / "r").mkdir()
    with pytest.raises(RnnscopeError, match="already exists.*--overwrite"):
        probe.record(ck, "abc", tmp_path / "r", progress=False)
    probe.record(ck, "abc", tmp_path / "r", overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_interrupt_leaves_no_run_and_no_debris(tmp_path, tiny_vocab):
    ck = char_model("lstm", tiny_vocab)
    good = probe.record(ck, TEXT, tmp_path / "r", progress=False)
    before = json.loads((good.path / "manifest.json").read_text())
    calls = {"n": 0}

    def interrupting_loss(output, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(output[0, : len(targets)], targets, reduction="none")
    with pytest.raises(RnnscopeError, match="interrupted: no run was written"):
        probe.record(ck, TEXT, tmp_path / "r", chunk=20, overwrite=True, loss=interrupting_loss, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["r"]           # no .partial left
    assert json.loads((tmp_path / "r" / "manifest.json").read_text()) == before   # the old run is intact


def test_nonfinite_states_are_flagged_not_silently_written(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(4, 3), nn.RNN(3, 5, nonlinearity="relu", batch_first=True))
    with torch.no_grad():
        m[1].weight_hh_l0.copy_(torch.eye(5) * 50)
        m[1].weight_ih_l0.abs_()
        m[0].weight.abs_()

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = m, nn.Linear(5, 4)

        def forward(self, ids):
            return self.head(self.body(ids)[0])
    encode = lambda s: torch.tensor([[ord(c) - 97 for c in s]])  # noqa: E731
    run = probe.record(Head(), "ab" * 20, tmp_path / "r", encode=encode, chunk=7, progress=False)
    assert run.manifest["nonfinite"] is True
    assert run.nonfinite["body.1.l0.h"] > 0
    assert run.manifest["keys"]["body.1.l0.h"]["overflow"] > 0     # finite in float32, inf in float16
    with Probe(m) as p:             # statistics leave NaN and Inf out, unit by unit, across chunks
        m(encode("ab" * 20))
    raw = p.trace["1.l0.h"][0]
    counts = run.manifest["keys"]["body.1.l0.h"]
    assert counts["nonfinite"] == int((~torch.isfinite(raw)).sum())
    assert counts["overflow"] == int((torch.isfinite(raw) & torch.isinf(raw.half())).sum())
    np.testing.assert_array_equal(np.asarray(run["body.1.l0.h"]), raw.half().numpy())   # NaN where NaN
    h = raw.double().numpy()
    h[~np.isfinite(h)] = np.nan
    assert np.isnan(h).any() and not np.isnan(h).all()
    rows = run.units[run.units.key == "body.1.l0.h"].sort_values("index")
    with warnings.catch_warnings():     # a unit that is never finite has NaN statistics
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = {"mean": np.nanmean(h, 0), "std": np.nanstd(h, 0), "min": np.nanmin(h, 0), "max": np.nanmax(h, 0)}
    for col, want in ref.items():
        np.testing.assert_allclose(rows[col].to_numpy(), want, rtol=1e-6, err_msg=col)


def test_refuses_when_the_disk_cannot_hold_the_run(tmp_path, tiny_vocab, monkeypatch):
    import rnnscope.probe.recording as R
    monkeypatch.setattr(R.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(RnnscopeError, match="needs .* GB but .* free"):
        probe.record(char_model("lstm", tiny_vocab), TEXT, tmp_path / "r", progress=False)
    assert not any(tmp_path.iterdir())


def test_bidirectional_models_are_not_streamed_in_chunks(tmp_path):
    class Bi(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn = nn.Embedding(30, 4), nn.LSTM(4, 3, bidirectional=True, batch_first=True)

        def forward(self, ids):
            return self.rnn(self.emb(ids))[0]
    enc = lambda s: torch.tensor([[ord(c) - 97 for c in s]])  # noqa: E731
    with pytest.raises(RnnscopeError, match="bidirectional.*--chunk 40"):
        probe.record(Bi(), "ab" * 20, tmp_path / "r", encode=enc, chunk=8, progress=False,
                     loss=lambda o, t: o[0, : len(t), 0])
    run = probe.record(Bi(), "ab" * 20, tmp_path / "r", encode=enc, chunk=40, progress=False,
                       loss=lambda o, t: o[0, : len(t), 0])
    assert "rnn.l0_reverse.c" in run


def test_open_run_errors(tmp_path, tiny_vocab):
    with pytest.raises(RnnscopeError, match="no run at .*rnnscope probe"):
        open_run(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(RnnscopeError, match="not an rnnscope run"):
        open_run(tmp_path / "junk")
    run = probe.record(char_model("gru", tiny_vocab), TEXT, tmp_path / "r", progress=False)
    with pytest.raises(RnnscopeError, match="no key 'rnn.l0.grad_h'.*--grad"):
        run["rnn.l0.grad_h"]
    m = json.loads((run.path / "manifest.json").read_text())
    (run.path / "states" / "rnn.l1.z.npy").unlink()
    with pytest.raises(RnnscopeError, match="damaged.*rnn.l1.z.npy"):
        open_run(run.path)
    (run.path / "manifest.json").write_text(json.dumps(dict(m, complete=False)))
    with pytest.raises(RnnscopeError, match="incomplete run"):
        open_run(run.path)


def test_a_last_chunk_of_one_character_has_zero_gradients_not_an_error(tmp_path, tiny_vocab):
    """The last character has no next one, so a chunk holding only it has no loss to differentiate."""
    ck = char_model("lstm", tiny_vocab)
    one = probe.record(ck, TEXT, tmp_path / "a", grad=True, chunk=len(TEXT), dtype="float32", progress=False)
    run = probe.record(ck, TEXT, tmp_path / "b", grad=True, chunk=len(TEXT) - 1, horizon=len(TEXT),
                       dtype="float32", progress=False)
    assert (np.asarray(run["rnn.l1.grad_h"][-1]) == 0).all()
    np.testing.assert_allclose(run["rnn.l0.grad_c"], one["rnn.l0.grad_c"], rtol=1e-5, atol=1e-6)
