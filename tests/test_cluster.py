"""Recording and analysing on a Dask cluster: a sharded Run (format 3) equals the single-process Run
bit for bit, survives a killed worker and an interrupted client, and a hostile one is refused in one
line. One LocalCluster of two worker processes (one thread each) on 127.0.0.1 serves every test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import rnnscope as rs
from rnnscope.analysis import distributed as dist
from rnnscope.analysis.neurons import find_neurons
from rnnscope.cli import main
from rnnscope.errors import RnnscopeError
from rnnscope.probe.corpus import read_documents
from rnnscope.store import read_table
from rnnscope.store.shards import ShardedRows

distributed = pytest.importorskip("distributed")

SPEC = '''
import torch
from rnnscope.zoo.model import Architecture, CharModel
from rnnscope.zoo.vocab import Vocab
CHARS = "abcxyz (){};=,\\n\\"/*"


def build():
    torch.manual_seed(0)
    return CharModel(Architecture("lstm", len(CHARS), 6, 10, 2)).eval(), Vocab(CHARS)
'''
# a tiny classifier: the first two logits at a document's last step, against the .jsonl line's label
CLASSIFIER = '''
import torch
import torch.nn.functional as F
from rnnscope.zoo.model import Architecture, CharModel
from rnnscope.zoo.vocab import Vocab
CHARS = "abcxyz (){};=,\\n\\"/*"


def classify(output, ids, document):
    return F.cross_entropy(output[0, -1:, :2].float(), torch.tensor([document["label"]]))


def build():
    torch.manual_seed(1)
    return CharModel(Architecture("gru", len(CHARS), 5, 8, 1)).eval(), Vocab(CHARS), classify
'''
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def _corpus(n: int, seed: int = 0) -> dict[str, str]:
    """C-like documents: strings, comments and brackets, so the features vary."""
    rng = np.random.default_rng(seed)
    words = ["abc", "x", "(y)", "{z;}", '"ab c"', "/* ab */", "\n", " ", "=", "c(x, y);"]
    return {f"d{i:02d}.c": "".join(rng.choice(words, rng.integers(4, 14))) for i in range(n)}


@pytest.fixture(scope="module")
def client():
    import torch
    torch.set_num_threads(1)            # as each worker's task: the same float results
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    ns = {}
    exec(SPEC, ns)
    spec = tmp_path_factory.mktemp("spec") / "tiny.py"
    spec.write_text(SPEC)
    return ns["build"](), spec


@pytest.fixture(scope="module")
def runs(client, subject, tmp_path_factory):
    """The same corpus recorded with gradients in one process and on the cluster (3 documents a shard)."""
    root, docs = tmp_path_factory.mktemp("runs"), _corpus(10)
    one = rs.record(subject[0], docs, root / "one", grad=True, chunk=16, horizon=16, progress=False)
    many = rs.record(subject[0], docs, root / "many", grad=True, chunk=16, horizon=16, progress=False, client=client,
                     shard_docs=3)
    return one, many


def _labelled(tmp_path: Path, n: int) -> Path:
    """A .jsonl corpus: a label on every line, a metadata object on some (a field only some documents have)."""
    lines = [{"text": text, "name": name, "label": i % 2, **({"meta": {"seen": [i, "é"]}} if i % 3 == 0 else {})}
             for i, (name, text) in enumerate(_corpus(n, seed=5).items())]
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    return path


def _assert_equal(one, many) -> None:
    assert len(many.shards) > 1 and many.manifest["format_version"] == 3
    assert one.keys() == many.keys() and len(one) == len(many) and one.text == many.text
    for key in one.keys():
        a, b = one[key], many[key]
        assert isinstance(b, ShardedRows) and b.shape == a.shape and b.dtype == a.dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), key
    np.testing.assert_array_equal(one.spans, many.spans)
    np.testing.assert_array_equal(one.ids, many.ids)
    assert np.asarray(one.loss).tobytes() == np.asarray(many.loss).tobytes()
    assert one.documents.equals(many.documents)
    assert one.manifest["loss"] == many.manifest["loss"]
    assert (one.document_loss is None) == (many.document_loss is None)
    if one.document_loss is not None:
        assert np.asarray(one.document_loss).tobytes() == many.document_loss.tobytes()
    assert one.manifest["model"]["checksum"] == many.manifest["model"]["checksum"]
    cols = ["mean", "std", "min", "max", "count"]       # merged from the shards' sums, not read again
    np.testing.assert_allclose(many.units[cols].to_numpy(float), one.units[cols].to_numpy(float), rtol=1e-12,
                               atol=1e-12)


def test_a_sharded_record_with_gradients_equals_one_process_bit_for_bit(runs):
    one, many = runs
    assert "rnn.l1.grad_c" in many.keys()
    _assert_equal(one, many)
    a, b = one["rnn.l1.c"], many["rnn.l1.c"]          # the readers' slices, across shard boundaries
    cut = int(many.manifest["shards"][1]["step_start"])
    np.testing.assert_array_equal(b[cut - 3:cut + 2, 4], a[cut - 3:cut + 2, 4])
    rows = np.array([0, cut, cut - 1, len(a) - 1, 5])
    np.testing.assert_array_equal(b[rows], a[rows])
    np.testing.assert_array_equal(b[-1], a[-1])
    np.testing.assert_array_equal(np.asarray(many.dask("rnn.l1.c")), np.asarray(a))
    html = many.path.parent / "unit.html"          # the dashboard's exporter opens it as any Run, no cluster
    assert main(["export", str(many.path), "--unit", "rnn.l1.c:4", "--out", str(html)]) == 0 and html.stat().st_size


def test_a_sharded_record_without_gradients_equals_one_process(client, subject, tmp_path):
    docs = _corpus(9, seed=1)
    one = rs.record(subject[0], docs, tmp_path / "one", chunk=5, progress=False)
    many = rs.record(subject[0], docs, tmp_path / "many", chunk=5, progress=False, client=client, shard_docs=2)
    assert "rnn.l0.grad_h" not in many.keys()
    _assert_equal(one, many)
    again = rs.record(subject[0], docs, tmp_path / "many", chunk=5, progress=False, client=client, shard_docs=4,
                      overwrite=True)                   # --overwrite replaces the whole Run
    assert len(again.shards) == 3
    _assert_equal(one, again)
    assert not list(tmp_path.glob(".*"))                # no build folder or partial left beside it


def test_a_labelled_corpus_with_a_loss_per_document_on_a_cluster_equals_one_process(client, tmp_path):
    """The workers' loss reads each document's label, and the sharded Run keeps every field and the
    loss of each document as one process does; the reference is the classifier's own loss, by hand."""
    import torch
    ns = {"__name__": "rnnscope_test_classifier"}       # not importable: cloudpickle sends it by value
    exec(CLASSIFIER, ns)
    docs = read_documents(_labelled(tmp_path, 7))
    one = rs.record(ns["build"](), docs, tmp_path / "one", grad=True, chunk=64, progress=False)
    many = rs.record(ns["build"](), docs, tmp_path / "many", grad=True, chunk=64, progress=False, client=client,
                     shard_docs=3)
    _assert_equal(one, many)
    assert many.manifest["loss"]["per"] == "document" and "bits_per_document" in many.manifest["loss"]
    assert many.documents["label"].tolist() == [i % 2 for i in range(7)]
    assert many.documents["meta"].tolist() == [{"seen": [i, "é"]} if i % 3 == 0 else None for i in range(7)]
    model, vocab, classify = ns["build"]()
    with torch.no_grad():
        want = [float(classify(model(torch.as_tensor(vocab.encode(t)).reshape(1, -1)), None, {"label": i % 2}))
                for i, t in enumerate(docs.texts)]
    np.testing.assert_allclose(many.document_loss, want, rtol=1e-5)
    assert np.isclose(many.manifest["loss"]["mean_nats"], np.mean(want), rtol=1e-5)
    assert "fields" not in rs.open_run(tmp_path / "one").documents      # a column on disk, parsed into columns


def test_fields_json_cannot_hold_are_left_out_and_a_layout_name_is_refused(subject, tmp_path, capsys):
    """No cluster: what the documents table keeps of fields from Python (any object may reach a loss)."""
    import torch
    rows = [{"text": "abc(x)", "label": 1, "weights": torch.ones(2)}, {"text": "x;y", "label": None}]
    run = rs.record(subject[0], rows, tmp_path / "r", progress=False)
    assert "'weights' is not JSON" in capsys.readouterr().out and "weights" not in run.documents
    assert run.documents["label"].tolist() == [1, None] and run.documents["name"].tolist() == ["0", "1"]
    with pytest.raises(RnnscopeError, match="has a field 'step_end', the name of a column") as err:
        rs.record(subject[0], [{"text": "abc", "step_end": 3}], tmp_path / "bad", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()


def test_a_worker_killed_mid_record_has_its_shard_recomputed(client, subject, tmp_path):
    docs = _corpus(8, seed=2)
    out, got = tmp_path / "many", {}
    pids = client.run(os.getpid)
    thread = threading.Thread(target=lambda: got.update(run=rs.record(
        subject[0], docs, out, grad=True, chunk=3, horizon=4, progress=False, client=client, shard_docs=1)))
    thread.start()
    first = tmp_path / ".many.shards" / "shards" / "00000"
    deadline = time.time() + 60
    while not first.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert first.exists() and not out.exists()          # killed while shards are still being recorded
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    thread.join(120)
    one = rs.record(subject[0], docs, tmp_path / "one", grad=True, chunk=3, horizon=4, progress=False)
    _assert_equal(one, got["run"])
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]     # the partial is cleared
    client.wait_for_workers(2, timeout=60)


def test_an_interrupted_command_resumes_with_the_shards_it_finished(client, subject, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in _corpus(6, seed=3).items():
        (corpus / name).write_text(text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rnnscope.cli", "probe", "--model", f"{subject[1]}:build", "--text", str(corpus),
           "--out", str(out), "--scheduler", client.scheduler.address, "--shard-docs", "1", "--chunk", "3"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = tmp_path / ".run.shards" / "shards" / "00000" / "manifest.json"
    deadline = time.time() + 90
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert first.exists() and not out.exists()
    inode = first.stat().st_ino
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reusing" in done.stdout and (out / "shards" / "00000" / "manifest.json").stat().st_ino == inode
    one = rs.record(subject[0], read_documents(corpus), tmp_path / "one", chunk=3, progress=False)
    _assert_equal(one, rs.open_run(out))


def test_the_command_line_sets_the_gradients_dtype_and_the_tasks_threads(client, subject, tmp_path, capsys):
    from rnnscope.probe.distributed import task_threads, worker_threads
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in _corpus(4, seed=6).items():
        (corpus / name).write_text(text)
    base = ["probe", "--model", f"{subject[1]}:build", "--text", str(corpus), "--grad", "--chunk", "8"]
    out = tmp_path / "run"
    assert main(base + ["--out", str(out), "--grad-dtype", "float16", "--dtype", "float32", "--scheduler",
                        client.scheduler.address, "--threads", "2", "--shard-docs", "2"]) == 0
    run = rs.open_run(out)
    dtypes = {k: v["dtype"] for k, v in run.manifest["keys"].items()}
    assert dtypes["rnn.l1.grad_c"] == "float16" and dtypes["rnn.l1.c"] == "float32" and len(run.shards) == 2
    assert run["rnn.l0.grad_h"].dtype == np.float16 and run.shards[1]["rnn.l0.h"].dtype == np.float32
    assert client.run(task_threads) == {w: 1 for w in client.run(os.getpid)}    # the cluster is left as it was
    undo = worker_threads(client, 3)
    try:                                # each task, on a worker's own thread, runs torch and numba on 3
        import torch
        got = client.gather([client.submit(lambda: (task_threads(), torch.get_num_threads()), pure=False)
                             for _ in range(4)])
        assert got == [(3, 3)] * 4
    finally:
        undo()
    capsys.readouterr()
    for flags, said in ((["--threads", "0", "--scheduler", client.scheduler.address], "from 1 to 1024"),
                        (["--threads", "2"], "no cluster is given"), (["--grad-dtype", "bfloat16"], "invalid choice")):
        try:
            code = main(base + ["--out", str(tmp_path / "bad")] + flags)
        except SystemExit as exit_:         # argparse's own refusal
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1 and said in err and not (tmp_path / "bad").exists(), err


def test_carry_is_refused_on_a_cluster_in_one_line(client, subject, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc")
    code = main(["probe", "--model", f"{subject[1]}:build", "--text", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--carry", "--scheduler", client.scheduler.address])
    err = capsys.readouterr().err
    assert code == 2 and "--carry" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_distributed_neuron_search_equals_one_process(client, runs, subject, tmp_path, monkeypatch):
    one, many = runs
    monkeypatch.setattr(dist, "BLOCKS_PER_TASK", 2)     # several tasks a part, blocks across shard boundaries
    feats, keys = ["in_string", "in_comment", "column", "paren_depth"], ["rnn.l0.h", "rnn.l1.c"]
    ref = find_neurons(one, feats, language="c", keys=keys, chunk=48, progress=False)
    got = find_neurons(many, feats, language="c", keys=keys, chunk=48, progress=False, client=client)
    assert (ref[["unit", "feature"]].to_numpy() == got[["unit", "feature"]].to_numpy()).all()
    for col in ("selection_score", "selection_p", "selection_q", "heldout_score", "heldout_p", "heldout_q"):
        np.testing.assert_allclose(got[col].to_numpy(float), ref[col].to_numpy(float), rtol=0, atol=1e-6)
    small = rs.record(subject[0], _corpus(6, seed=4), tmp_path / "h", kinds=["h"], progress=False, client=client,
                      shard_docs=2)
    assert main(["analyze", str(small.path), "--scheduler", client.scheduler.address, "--no-decay", "--features",
                 "in_string,column", "--language", "c", "--contexts", "2", "--sparse", "--threads", "2"]) == 0
    assert len(read_table(small, "neurons")) == 2 * 20      # 2 keys x 10 units, 2 features
    assert set(read_table(small, "sparse")["feature"]) == {"in_string", "column"}


def _manifest(run: Path, change) -> None:
    m = json.loads((run / "manifest.json").read_text())
    change(m)
    (run / "manifest.json").write_text(json.dumps(m))


def _lie_about_steps(run: Path) -> None:
    import hashlib
    shard = run / "shards" / "00001" / "manifest.json"
    m = json.loads(shard.read_text())
    m["steps"] += 1
    shard.write_text(json.dumps(m))
    _manifest(run, lambda t: t["shards"][1].update(manifest_sha256=hashlib.sha256(shard.read_bytes()).hexdigest()))


def _link_out(run: Path) -> None:
    away = run.parent / "elsewhere"
    shutil.move(run / "shards" / "00001", away)
    (run / "shards" / "00001").symlink_to(away.resolve())


def _fields_not_json(run: Path) -> None:
    import pandas as pd
    table = run / "shards" / "00001" / "documents.parquet"
    pd.read_parquet(table).assign(fields='{"label": 1').to_parquet(table)


HOSTILE = {
    "a shard whose document fields are not JSON": (_fields_not_json, "are not JSON"),
    "a shard whose manifest lies about its steps": (_lie_about_steps, "says steps"),
    "a shard that is a link out of the Run": (_link_out, "symbolic link"),
    "a missing shard": (lambda r: shutil.rmtree(r / "shards" / "00002"), "shard 00002 is missing"),
    "overlapping shards": (lambda r: _manifest(r, lambda m: m["shards"][1].update(
        doc_start=m["shards"][1]["doc_start"] - 1)), "overlaps"),
    "a shard listed twice": (lambda r: _manifest(r, lambda m: m["shards"].__setitem__(2, m["shards"][1])), "twice"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_sharded_run_is_refused_in_one_line(runs, tmp_path, capsys, case):
    spoil, said = HOSTILE[case]
    run = tmp_path / "run"
    shutil.copytree(runs[1].path, run, symlinks=True)
    spoil(run)
    with pytest.raises(RnnscopeError, match=said) as err:
        rs.open_run(run)
    assert "\n" not in str(err.value)
    for argv in (["analyze", str(run), "--no-decay"], ["export", str(run), "--unit", "rnn.l0.h:0", "--out",
                                                       str(tmp_path / "x.html")], ["serve", str(run)]):
        assert main(argv) == 2
        out = capsys.readouterr().err.strip()
        assert len(out.splitlines()) == 1 and said in out, (argv, out)


def test_contexts_saturation_and_gradient_norms_on_the_cluster_equal_one_process(client, runs):
    """The other whole-Run reads as reductions over the shards give the single-process tables: the same
    top-k steps (ties by the earlier step, checked against a full sort), the same counts, the same norms."""
    from rnnscope.analysis import reductions
    from rnnscope.analysis.contexts import top_contexts
    from rnnscope.analysis.gates import gate_saturation
    from rnnscope.analysis.gradflow import gradient_norms
    one, many = runs
    sizes = np.diff([s["step_start"] for s in many.manifest["shards"]] + [len(many)])
    k = int(sizes.min()) + 2                     # more than one shard holds: its top-k is all its rows
    keys = ["rnn.l0.h", "rnn.l1.c"]
    ref = top_contexts(one, k=k, keys=keys, chunk=7, progress=False)
    got = top_contexts(many, k=k, keys=keys, chunk=7, progress=False, client=client)
    a = np.asarray(one["rnn.l1.c"], np.float32)  # an independent reference: sort every step
    has = rs.analysis.source.as_source(one).has_text
    v = np.where(has[:, None], np.nan_to_num(a, nan=-np.inf), -np.inf)
    want = np.lexsort((np.broadcast_to(np.arange(len(v))[:, None], v.shape), -v), axis=0)[:k]
    top = got[(got.key == "rnn.l1.c") & (got.side == "top")].sort_values(["index", "rank"])
    np.testing.assert_array_equal(top["step"].to_numpy().reshape(-1, k).T, want)
    plain = [c for c in ref.columns if c != "values"]
    assert ref[plain].equals(got[plain])
    assert all(np.array_equal(x, y) for x, y in zip(ref["values"], got["values"]))
    sat_ref, sat = gate_saturation(one), gate_saturation(many, client=client)
    assert len(sat) and sat[["key", "index", "left", "right"]].equals(sat_ref[["key", "index", "left", "right"]])
    np.testing.assert_allclose(sat["mean"], sat_ref["mean"], rtol=0, atol=1e-9)
    norms_ref, norms = gradient_norms(one, chunk=5), gradient_norms(many, chunk=5, client=client)
    assert norms.shape[1] >= 2 and norms.equals(norms_ref) and norms.attrs == norms_ref.attrs
    trace = {"rnn.l0.f": np.full((4, 2), 0.95, np.float32)}          # an in-memory trace: counted here
    assert reductions.saturation(client, trace["rnn.l0.f"], 0.1, 0.9, 2) is None
    assert gate_saturation(trace, text="abcd", client=client)["right"].tolist() == [1.0, 1.0]



def test_features_computed_on_the_workers_from_each_shards_text_equal_the_clients(client, runs):
    """Each shard is whole documents and the tracks are per character within one, so a worker's
    columns from its shard's own text and spans are the client's over the whole text, exactly."""
    from rnnscope.analysis import features as F, reductions
    from rnnscope.analysis.neurons import feature_table
    from rnnscope.analysis.source import as_source
    one, many = runs
    names = ["in_string", "column", "brace_depth"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # some documents hold no string: said per document
        ref, src = F.steps(as_source(one), names, "c"), as_source(many)
    got = reductions.shard_steps(client, src, names, "c")
    assert list(got) == names and len(got["column"]) == len(many)
    for k, col in got.items():
        np.testing.assert_array_equal(col, ref[k].to_numpy())
        assert np.nanmax(col) > 0                                        # the planted C text makes them vary
    mixed = {"in_string": F.in_string, "vowel": lambda text: np.array([c in "aeiou" for c in text], float),
             "paren": F.on_tokens(lambda ts: [t == "(" for t in ts]), "column": F.column}
    table, binary = feature_table(src, reductions.worker_features(client, src, mixed))
    want, want_binary = feature_table(as_source(one), mixed)
    assert list(table) == list(mixed) and binary == want_binary and table.equals(want)
    assert reductions.worker_features(client, as_source(one), names) == names     # unsharded: the client's path


def test_the_sparse_probe_on_the_cluster_equals_one_process(client, runs):
    """Its feature track and its fitting and held-out rows come from the workers, shard by shard: the
    same inputs, so the same path; the rows against NumPy's own fancy indexing of the unsharded Run."""
    from rnnscope.analysis.sparse import sparse_probe
    one, many = runs
    by_key = {"rnn.l1.c": [4, 0, 7], "rnn.l0.h": [2]}
    steps = np.random.default_rng(0).permutation(len(one))[:50]        # any order, across every shard
    want = np.concatenate([np.asarray(one[k], np.float64)[steps][:, i] for k, i in by_key.items()], 1)
    got = dist.gather_rows(client, {k: many[k] for k in by_key}, by_key, steps)
    assert got.shape == (50, 4) and got.tobytes() == want.tobytes()
    assert dist.gather_rows(client, {"x": np.zeros((5, 2))}, {"x": [0]}, np.arange(3)) is None   # a trace: here
    for feature in ("in_string", "column"):                 # logistic and linear
        ref = sparse_probe(one, feature, language="c", keys=["rnn.l0.h", "rnn.l1.c"], steps=6)
        path = sparse_probe(many, feature, language="c", keys=["rnn.l0.h", "rnn.l1.c"], steps=6, client=client)
        assert path.equals(ref) and path.attrs == ref.attrs and path["n_units"].max() > 0


def test_a_sharded_run_is_served_from_its_shards(runs):
    """The server's snapshot holds a sharded Run's arrays as the Run reads them (its shards' files: there
    is no RUN/states/), and the page's session is built from them."""
    import urllib.request
    from browser import served
    from rnnscope.dashboards.snapshot import HeldRun
    one, many = runs
    held = HeldRun(many)
    for key in one.keys():
        assert np.asarray(held[key]).tobytes() == np.asarray(one[key]).tobytes()
    assert np.asarray(held.loss).tobytes() == np.asarray(one.loss).tobytes()
    with served(many.path) as (url, proc):
        page = urllib.request.urlopen(url, timeout=60).read().decode()
        assert "bokeh" in page.lower() and proc.poll() is None
    assert "Traceback" not in proc.stderr.read()
