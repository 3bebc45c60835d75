"""Step loops on a Dask cluster: a sharded Run with attention, and a sharded Run of frames, equal the
single-process Run of the same model and documents (every state, gate, gradient, attention row and
time stamp, bit for bit), read as one (offsets rebased, a document's rows a view of its shard's file),
checked on open as strictly as one Run, and resumed from the shards an interrupted record finished.
One LocalCluster of two single-thread worker processes on 127.0.0.1 serves every test."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pandas as pd
import pytest

import rnnscope as rs
from rnnscope.cli import main
from rnnscope.errors import RnnscopeError
from rnnscope.store.shards import ShardedRows
from test_cluster import client  # noqa: F401  (the cluster: two single-thread workers on 127.0.0.1)

distributed = pytest.importorskip("distributed")

# Sent to the workers by value (exec'd under a name no worker can import), as a notebook's classes are.
MODELS = '''
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
FAIL = {}           # {"flag": path, "wait": folder, "shards": n}: the resume test's planted failure


def encode(text):
    return torch.tensor([ALPHABET.index(ch) + 1 for ch in text])


class Attention(nn.Module):
    """(h [B, H], enc [B, S, H]) -> (context [B, H], weights [B, S])."""

    def __init__(self, H):
        super().__init__()
        self.query = nn.Linear(H, H)

    def forward(self, h, enc):
        w = torch.einsum("bh,bsh->bs", self.query(h), enc).softmax(1)
        return torch.einsum("bs,bsh->bh", w, enc), w


class Decoder(nn.Module):
    """A GRU encoder over the source (the target itself when none is given), an LSTMCell called once per
    target id with attention over the encoder's states before each call."""

    def __init__(self, V=27, E=4, H=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.encoder = nn.Embedding(V, E), nn.GRU(E, H, batch_first=True)
        self.attention, self.cell, self.out = Attention(H), nn.LSTMCell(E + H, H), nn.Linear(H, V)

    def forward(self, ids, source=None):
        enc, _ = self.encoder(self.embed(ids if source is None else source))
        h = c = enc.new_zeros(len(ids), self.cell.hidden_size)
        logits = []
        for t in range(ids.shape[1]):
            context, _ = self.attention(h, enc)
            h, c = self.cell(torch.cat([self.embed(ids[:, t]), context], 1), (h, c))
            logits.append(self.out(h))
        return torch.stack(logits, 1)


def _planted(document):
    """Fails the document named "last" once the other shards are written, while the flag file is there."""
    if FAIL and document["name"] == "last" and Path(FAIL["flag"]).exists():
        deadline = time.time() + 60
        while len(list(Path(FAIL["wait"]).glob("0*"))) < FAIL["shards"] and time.time() < deadline:
            time.sleep(0.05)
        raise ValueError("planted failure")


def translate(model, ids, document):
    _planted(document)
    return model(ids, encode(document["source"])[None] if "source" in document else None)


class Frames(nn.Module):
    """An audio-style loop: one GRUCell called per frame of x [1, T, 3]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.cell, self.head = nn.GRUCell(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        h, out = x.new_zeros(1, 4), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            out.append(h)
        return self.head(torch.stack(out, 1))


def listen(model, x, document):
    _planted(document)
    return model(x)


def frame_loss(out, x):             # predict feature 1 of each frame: [T]
    return (out[0, :, 0] - x[:, 1]) ** 2
'''
WORDS = ["recurrent", "loops", "cells", "gate", "attention", "state", "unit"]
PAIRS = [{"name": f"p{i}", "text": t, "source": s} for i, (t, s) in
         enumerate([("xyz", "abcdef"), ("hello", "qrs"), ("ab", "abab"), ("cells", "llec"), ("w", "wxyzw")])]
PAIRS[-1]["name"] = "last"          # the document the resume test fails once


@pytest.fixture(scope="module")
def ns():
    space = {"__name__": "rnnscope_test_steploop_models"}
    exec(MODELS, space)
    return space


def _text_subject(ns):
    return rs.Subject(ns["Decoder"]().eval(), ns["encode"], call=ns["translate"])


def _clips(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n):
        T = int(rng.integers(8, 16))
        out.append({"name": "last" if d == n - 1 else f"clip{d}", "input": rng.normal(size=(T, 3)).astype(np.float32),
                    "times": np.cumsum(rng.uniform(0.01, 0.03, T)), "speaker": f"s{d % 2}"})
    return out


def _frames_subject(ns):
    return rs.Subject(ns["Frames"]().eval(), loss=ns["frame_loss"], call=ns["listen"])


@pytest.fixture(scope="module")
def runs(client, ns, tmp_path_factory):
    """Each recorded in one process and on the cluster: attention over its own positions with gradients,
    attention over a source text, and frames with gradients of a per-step loss."""
    root, out = tmp_path_factory.mktemp("steploops"), {}
    jobs = {"positions": (_text_subject, WORDS, dict(grad=True, attention=["attention"], shard_docs=3)),
            "source": (_text_subject, PAIRS, dict(loss=None, attention=["attention"], modules=["cell"], shard_docs=2)),
            "frames": (_frames_subject, _clips(7), dict(grad=True, dtype="float32", shard_docs=3))}
    for name, (subject, docs, kw) in jobs.items():
        one = rs.record(subject(ns), docs, root / f"{name}-one", progress=False,
                        **{k: v for k, v in kw.items() if k != "shard_docs"})
        many = rs.record(subject(ns), docs, root / f"{name}-many", progress=False, client=client, **kw)
        out[name] = one, many
    return out


def _assert_equal(one, many) -> None:
    """Every state, gate and gradient, the loss, the documents, the time stamps and the attention."""
    assert many.manifest["format_version"] == 3 and len(many.shards) > 1
    assert one.keys() == many.keys() and len(one) == len(many) and one.text == many.text
    for key in one.keys():
        assert isinstance(many[key], ShardedRows)
        assert np.asarray(one[key]).tobytes() == np.asarray(many[key]).tobytes(), key
    assert (one.loss is None) == (many.loss is None)
    if one.loss is not None:
        assert np.asarray(one.loss).tobytes() == np.asarray(many.loss).tobytes()
    assert one.documents.equals(many.documents) and np.array_equal(one.spans, many.spans)
    assert one.frames == many.frames
    if one.frames:
        assert one.times.dtype == many.times.dtype == np.float64 and np.array_equal(one.times, many.times)
    assert one.attention_names() == many.attention_names()
    assert {k: one.manifest.get(k) for k in ("attention", "source", "encoder", "ids")} == \
        {k: many.manifest.get(k) for k in ("attention", "source", "encoder", "ids")}
    for name in one.attention_names():
        a, b = one.attention(name), many.attention(name)
        assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.lengths, b.lengths) and len(a) == len(b)
        for d in range(len(one.documents)):
            x, y = a[d], b[d]
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
            assert np.array_equal(x, y, equal_nan=True), (name, d)
        assert all(np.array_equal(a.row(s), b.row(s)) for s in range(len(one)))
    if one.source is not None:
        assert [one.source.tokens(d) for d in range(len(one.documents))] == \
            [many.source.tokens(d) for d in range(len(many.documents))]
        assert np.array_equal(one.source.bounds, many.source.bounds) and one.source.text == many.source.text


@pytest.mark.parametrize("name", ["positions", "source", "frames"])
def test_a_sharded_step_loop_run_equals_one_process_bit_for_bit(runs, name):
    one, many = runs[name]
    _assert_equal(one, many)
    assert ("cell.l0.grad_h" in many.keys()) == (name != "source")
    assert rs.open_run(many.path).manifest == many.manifest       # opened again: the same


def test_attention_reads_as_one_run_a_document_a_view_of_its_shards_file(runs):
    one, many = runs["positions"]
    weights, at = many.attention("attention"), 0
    assert weights.lengths.tolist() == [len(w) for w in WORDS for _ in w]
    for k, shard in enumerate(many.shards):                     # offsets rebased onto the shards one after another
        own = shard.attention("attention")
        assert np.array_equal(weights.offsets[at:at + len(shard) + 1] - weights.offsets[at], own.offsets)
        for d in range(len(shard.documents)):
            got = weights[int(many.manifest["shards"][k]["doc_start"]) + d]
            assert isinstance(own.flat, np.memmap) and np.shares_memory(got, own.flat)     # not a copy
        at += len(shard)
    cut = int(many.manifest["shards"][1]["step_start"])
    assert np.array_equal(weights.row(cut), one.attention("attention").row(cut))
    assert many.source is None and runs["source"][1].manifest["source"]["chars"] == sum(len(p["source"]) for p in PAIRS)


@pytest.mark.filterwarnings("ignore")             # a few short clips: a coarse null, said as a warning
def test_frames_on_a_cluster_keep_their_times_and_find_neurons_gives_the_same_table(runs):
    one, many = runs["frames"]
    clips = _clips(7)
    assert many.frames and many.text == "" and many.ids is None and "frames (no text)" in repr(many)
    assert np.array_equal(many.times, np.concatenate([c["times"] for c in clips]))
    assert many.documents["speaker"].tolist() == [c["speaker"] for c in clips]
    assert all(s.frames and len(s.times) == len(s) for s in many.shards)
    loud = np.concatenate([c["input"][:, 0] > 0 for c in clips]).astype(float)       # a per-step array feature
    ref = rs.find_neurons(one, features={"loud": loud}, progress=False)
    got = rs.find_neurons(many, features={"loud": loud}, progress=False)
    assert len(got) > 0 and got.attrs["scored_steps"] == len(many) and got.attrs == ref.attrs
    pd.testing.assert_frame_equal(ref, got)


def _export(run, tmp_path, name: str) -> list[str]:
    attention = ["--attention", "attention"] if "attention" in json.loads((run / "manifest.json").read_text()) \
        else ["--unit", "cell.l0.h:0"]
    return ["export", str(run), *attention, "--out", str(tmp_path / name)]


def _shard_manifest(run, shard: str, change) -> None:
    """Edit shard ``shard``'s manifest and list its new checksum in the top manifest, as a forger would."""
    file = run / "shards" / shard / "manifest.json"
    m = json.loads(file.read_text())
    change(m)
    file.write_text(json.dumps(m))
    top = json.loads((run / "manifest.json").read_text())
    next(e for e in top["shards"] if e["name"] == shard)["manifest_sha256"] = \
        hashlib.sha256(file.read_bytes()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(top))


def _offsets_not_tiling(run):
    file = run / "shards/00001/attention/attention/offsets.npy"
    offsets = np.load(file)
    offsets[2] = offsets[1]
    np.save(file, offsets)


def _not_weights(run):
    file = run / "shards/00001/attention/attention/weights.npy"
    flat = np.load(file)
    flat[3] += 0.5
    np.save(file, flat)


def _times_back(run):
    file = run / "shards/00001/times.npy"
    np.save(file, np.load(file)[::-1].copy())


def _renamed(run):
    def rename(m):
        entry = m["attention"].pop("attention")
        m["attention"]["attn"] = {**entry, "file": "attention/attn/weights.npy",
                                  "offsets": "attention/attn/offsets.npy"}
    (run / "shards/00001/attention/attention").rename(run / "shards/00001/attention/attn")
    _shard_manifest(run, "00001", rename)


def _positions_lie(run):
    top = json.loads((run / "manifest.json").read_text())
    top["attention"]["attention"]["positions"] += 1
    (run / "manifest.json").write_text(json.dumps(top))


HOSTILE = {
    "a shard whose offsets do not tile its rows": ("positions", _offsets_not_tiling, "does not give each step a row"),
    "a shard's row that is not weights": ("positions", _not_weights, "a row that is not attention weights"),
    "a shard's times going back within a document": ("frames", _times_back, "must not decrease within a document"),
    "a shard whose attention names differ from the Run's": ("positions", _renamed, "holds attention of other modules"),
    "a top manifest whose positions its shards do not add up to": ("positions", _positions_lie, "do not add up"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_sharded_step_loop_run_is_refused_in_one_line(runs, tmp_path, capsys, case):
    name, spoil, said = HOSTILE[case]
    run = tmp_path / "run"
    shutil.copytree(runs[name][1].path, run)
    spoil(run)
    with pytest.raises(RnnscopeError, match=said) as err:
        rs.open_run(run)
    assert "\n" not in str(err.value)
    for argv in (_export(run, tmp_path, "x.html"), ["analyze", str(run), "--no-decay"]):
        assert main(argv) == 2
        out = capsys.readouterr().err.strip()
        assert len(out.splitlines()) == 1 and said in out, (argv, out)
    assert not (tmp_path / "x.html").exists()


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")
def test_export_draws_a_sharded_runs_attention(runs, tmp_path):
    many = runs["source"][1]
    assert main(_export(many.path, tmp_path, "x.png") + ["--document", "last"]) == 0
    data = (tmp_path / "x.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    width, height = struct.unpack(">II", data[16:24])
    assert 400 <= width <= 1600 and 200 <= height <= 1000


@pytest.mark.parametrize("name", ["source", "frames", "frames changed"])
def test_an_interrupted_record_resumes_with_the_shards_it_finished(client, ns, runs, tmp_path, capsys, name):
    """The last document fails once the other shards are written (a planted error: the record stops as
    an interrupted one does); the same record again reuses those shards and writes only the last. A
    frames shard has no text to check it by: a frame changed since makes another plan, recorded afresh."""
    subject, docs, kw = (_text_subject, PAIRS, dict(loss=None, attention=["attention"], modules=["cell"])) \
        if name == "source" else (_frames_subject, _clips(7), dict(grad=True, dtype="float32"))
    out, flag = tmp_path / "many", tmp_path / "fail"
    flag.touch()
    ns["FAIL"].update(flag=str(flag), wait=str(tmp_path / ".many.shards" / "shards"), shards=len(docs) - 1)
    try:
        with pytest.raises(RnnscopeError, match="planted failure"):
            rs.record(subject(ns), docs, out, progress=False, client=client, shard_docs=1, **kw)
        first = tmp_path / ".many.shards" / "shards" / "00000" / "manifest.json"
        assert not out.exists() and first.exists()
        inode = first.stat().st_ino
        flag.unlink()
        if name == "frames changed":
            docs[0]["input"][3, 1] += 1
        capsys.readouterr()
        many = rs.record(subject(ns), docs, out, progress=False, client=client, shard_docs=1, **kw)
    finally:
        ns["FAIL"].clear()
    said = capsys.readouterr().out
    if name == "frames changed":
        assert "reusing" not in said
        one = rs.record(subject(ns), docs, tmp_path / "one", progress=False, **kw)
        assert not np.array_equal(one["cell.l0.h"], runs["frames"][0]["cell.l0.h"])
    else:
        assert f"reusing {len(docs) - 1} of {len(docs)} shards" in said
        assert (out / "shards" / "00000" / "manifest.json").stat().st_ino == inode
        one = runs[name][0]
    _assert_equal(one, many)


FRAMES_SPEC = MODELS + '''

def build():
    return Frames().eval()
'''


def test_probe_frames_on_a_cluster_from_the_command_line_equals_one_process(client, tmp_path, capsys):
    """The workers load the model from its spec knowing it reads frames (no encoder to refuse it for)."""
    spec = tmp_path / "frames_spec.py"
    spec.write_text(FRAMES_SPEC)
    clips = _clips(5, seed=4)
    np.savez(tmp_path / "clips.npz", **{c["name"]: c["input"] for c in clips})
    np.savez(tmp_path / "times.npz", **{c["name"]: c["times"] for c in clips})
    base = ["probe", "--model", f"{spec}:build", "--loss", f"{spec}:frame_loss",
            "--frames", str(tmp_path / "clips.npz"), "--times", str(tmp_path / "times.npz"), "--grad",
            "--dtype", "float32"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0
    assert main(base + ["--out", str(tmp_path / "many"), "--scheduler", client.scheduler.address,
                        "--shard-docs", "2"]) == 0
    said = capsys.readouterr().out
    assert said.count(f"{sum(len(c['input']) for c in clips)} frames in 5 documents") == 2, said
    one, many = rs.open_run(tmp_path / "one"), rs.open_run(tmp_path / "many")
    assert len(many.shards) == 3 and "cell.l0.grad_h" in many.keys() and many.frames
    _assert_equal(one, many)


def test_a_corpus_with_a_source_for_some_documents_only_is_refused_before_any_task(client, ns, tmp_path):
    docs = [*PAIRS[:2], {"name": "bare", "text": "abc"}]
    with pytest.raises(RnnscopeError, match="document 'bare' has no source text, while others have one") as err:
        rs.record(_text_subject(ns), docs, tmp_path / "run", loss=None, attention=["attention"], progress=False,
                  client=client)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())       # no build folder either
