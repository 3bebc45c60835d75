"""The Run store on its own: the format, the writer's swap, the one atomic write, the key grammar.

A v1 Run is built here by hand, file by file, as the code before the store wrote it: the store
must keep reading it, and what its writer produces must match the same layout.
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rnnscope import store
from rnnscope.errors import RnnscopeError
from rnnscope.store import writer as W

KEYS = {"rnn.l0.h": 3, "rnn.l0.c": 3}
TEXT = "ab\ncd\n"


def units_frame() -> pd.DataFrame:
    return pd.DataFrame([{"unit": f"{k}:{i}", "key": k, "index": i, "module": "rnn", "layer": 0, "reverse": False,
                          "kind": k[-1], "mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0}
                         for k, u in KEYS.items() for i in range(u)])


def handmade_v1_run(path, text=TEXT):
    """A Run laid out as format version 1 was written before the store existed."""
    (path / "states").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for key, units in KEYS.items():
        np.save(path / f"states/{key}.npy", rng.standard_normal((len(text), units)).astype(np.float16))
    np.save(path / "loss.npy", np.append(rng.random(len(text) - 1), np.nan).astype(np.float32))
    (path / "text.txt").write_text(text, encoding="utf-8")
    units_frame().to_parquet(path / "units.parquet")
    manifest = {"format": "rnnscope-run", "format_version": 1, "complete": True, "created": "2026-01-01T00:00:00+00:00",
                "model": {"source": "zoo:lstm-linux", "class": "CharModel", "checksum": "0" * 64, "card_name": "x",
                          "weights_sha256": "1" * 64, "modules": {"rnn": {"type": "LSTM", "layers": 1, "hidden": 3,
                                                                          "bidirectional": False, "proj_size": 0}}},
                "vocab": "\nabcd", "unk": None, "text": {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()},
                "dtype": "float16", "kinds": ["c", "h"], "grad": False, "chunk": 2048, "grad_horizon": None,
                "loss": {"mean_nats": 1.0, "bits_per_char": 1.4},
                "keys": {k: {"units": u, "file": f"states/{k}.npy", "nonfinite": 0, "overflow": 0} for k, u in KEYS.items()},
                "nonfinite": False}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def write_run(out, text=TEXT, *, overwrite=False, rows=None):
    """A Run through the store's writer, states filled with ``rows`` (default: a ramp)."""
    with store.RunWriter(out, text, dtype="float32", overwrite=overwrite, log=lambda s: None) as w:
        for key, units in KEYS.items():
            data = rows if rows is not None else np.arange(len(text) * units, dtype=np.float32).reshape(-1, units)
            w.states(key, units).write(0, data)
        w.loss().write(0, np.zeros(len(text), np.float32))
        w.units(units_frame())
        return w.commit({"model": {"checksum": "0" * 64}, "vocab": None, "unk": None,
                         "loss": {"kind": "next-token", "mean_nats": 0.0},
                         "keys": {k: {"units": u, "nonfinite": 0, "overflow": 0} for k, u in KEYS.items()}})


# two documents, word steps, BOS and EOS steps without text: "ab cd\n" | "ef"
DOCS_TEXT = "ab cd\nef"
SPANS = np.array([[-1, -1], [0, 2], [3, 5], [5, 6], [-1, -1], [6, 8]], np.int64)
IDS = np.array([1, 5, 6, 7, 2, 8], np.int64)


def write_documents_run(out, *, spans=SPANS, ids=IDS, loss=True):
    """A format 2 Run of two documents through the store's writer."""
    docs = store.documents_frame(["first", "second"], [0, 6, 8], [0, 5, 6])
    with store.RunWriter(out, DOCS_TEXT, spans=spans, ids=ids, documents=docs, dtype="float32",
                         log=lambda s: None) as w:
        for key, units in KEYS.items():
            w.states(key, units).write(0, np.arange(len(spans) * units, dtype=np.float32).reshape(-1, units))
        if loss:
            w.loss().write(0, np.arange(len(spans), dtype=np.float32))
        w.units(units_frame())
        return w.commit({"model": {"checksum": "0" * 64}, "vocab": None, "unk": None,
                         "loss": {"kind": "user", "mean_nats": 2.5} if loss else None,
                         "encoder": {"kind": "spans", "name": "words"},
                         "keys": {k: {"units": u, "nonfinite": 0, "overflow": 0} for k, u in KEYS.items()}})


def as_v1(out):
    """Rewrite a fresh Run as format 1 wrote it: no spans, ids or documents, a v1 manifest."""
    m = json.loads((out / "manifest.json").read_text())
    for field in ("steps", "documents", "encoder", "carry", "ids"):
        m.pop(field)
    m["format_version"], m["loss"] = 1, {"mean_nats": 1.0, "bits_per_char": 1.4}
    (out / "manifest.json").write_text(json.dumps(m))
    for name in ("spans.npy", "ids.npy", "documents.parquet"):
        (out / name).unlink(missing_ok=True)
    return out


def test_a_v1_run_written_before_the_store_still_opens(tmp_path):
    run = store.open_run(handmade_v1_run(tmp_path / "old"))
    assert run.text == TEXT and sorted(run.keys()) == sorted(KEYS) and run["rnn.l0.c"].shape == (6, 3)
    assert len(run.units) == 6 and np.isnan(run.loss[-1])


def test_a_v1_run_reads_as_one_document_of_one_step_per_character(tmp_path):
    run = store.open_run(as_v1(write_run(tmp_path / "r")))
    assert run.manifest["format_version"] == 1 and len(run) == run.chars == len(TEXT) == run.manifest["steps"]
    np.testing.assert_array_equal(run.spans, np.stack([np.arange(6), np.arange(1, 7)], 1))
    assert run.ids is None and run.has_text.all() and (run.step_document == 0).all()
    assert run.documents.to_dict("records") == [{"name": "text", "char_start": 0, "char_end": 6, "step_start": 0,
                                                 "step_end": 6}]
    assert run.manifest["encoder"] == {"kind": "char", "name": None} and run.manifest["loss"]["kind"] == "next-token"
    assert run.tokens(0, 3) == ["a", "b", "\n"] and run.loss is not None
    np.testing.assert_array_equal(run.per_step(np.arange(6) * 10), np.arange(6) * 10.0)


def test_a_run_of_documents_maps_steps_to_spans_and_documents(tmp_path):
    run = store.open_run(write_documents_run(tmp_path / "r"))
    assert len(run) == 6 and run.chars == 8 and run.text == DOCS_TEXT and run.manifest["format_version"] == 2
    assert run.manifest["steps"] == 6 and run.manifest["documents"] == 2
    assert run.manifest["encoder"] == {"kind": "spans", "name": "words"}
    np.testing.assert_array_equal(run.spans, SPANS)
    np.testing.assert_array_equal(run.ids, IDS)
    np.testing.assert_array_equal(run.has_text, [False, True, True, True, False, True])
    np.testing.assert_array_equal(run.step_document, [0, 0, 0, 0, 0, 1])
    assert list(run.documents.name) == ["first", "second"] and run.documents.step_end.tolist() == [5, 6]
    assert run.tokens() == ["", "ab", "cd", "\n", "", "ef"] and run.tokens(1, 3) == ["ab", "cd"]
    got = run.per_step(np.arange(8) * 1.5)           # the value at each span's last character
    np.testing.assert_array_equal(got[[1, 2, 3, 5]], [1.5, 6.0, 7.5, 10.5])
    assert np.isnan(got[[0, 4]]).all() and run["rnn.l0.h"].shape == (6, 3)
    np.testing.assert_array_equal(run.loss, np.arange(6, dtype=np.float32))
    with pytest.raises(RnnscopeError, match="one value per character"):
        run.per_step(np.zeros(6))


def test_a_run_recorded_without_a_loss_has_none(tmp_path):
    run = store.open_run(write_documents_run(tmp_path / "r", loss=False))
    assert run.loss is None and run.manifest["loss"] is None and not (run.path / "loss.npy").exists()


def _edit_npy(name, change):
    def edit(out):
        a = np.load(out / name)
        np.save(out / name, change(a))
    return edit


def _edit_docs(change):
    def edit(out):
        d = pd.read_parquet(out / "documents.parquet")
        change(d)
        d.to_parquet(out / "documents.parquet")
    return edit


def _edit_manifest(change):
    def edit(out):
        m = json.loads((out / "manifest.json").read_text())
        change(m)
        (out / "manifest.json").write_text(json.dumps(m))
    return edit


def _set(a, index, value):
    a = a.copy()
    a[index] = value
    return a


DAMAGE = {
    "span past the text": (_edit_npy("spans.npy", lambda a: _set(a, (5, 1), 9)), r"\(6, 9\) at step 5.*inside"),
    "span start >= end": (_edit_npy("spans.npy", lambda a: _set(a, 2, [4, 4])), r"\(4, 4\) at step 2.*start < end"),
    "half a no-text span": (_edit_npy("spans.npy", lambda a: _set(a, (0, 1), 3)), r"\(-1, 3\) at step 0.*\(-1, -1\)"),
    "spans out of order": (_edit_npy("spans.npy", lambda a: _set(a, 2, [0, 1])), r"\(0, 1\) at step 2.*in order"),
    "span in another document": (_edit_npy("spans.npy", lambda a: _set(a, 3, [5, 7])), r"step 3 outside its document"),
    "spans of float": (_edit_npy("spans.npy", lambda a: a.astype(np.float64)), r"spans.npy holds float64"),
    "spans one short": (_edit_npy("spans.npy", lambda a: a[:-1]), r"spans.npy has shape \[5, 2\]"),
    "ids negative": (_edit_npy("ids.npy", lambda a: _set(a, 1, -4)), r"negative id -4"),
    "ids missing": (lambda out: (out / "ids.npy").unlink(), r"ids.npy is missing"),
    "documents with a gap": (_edit_docs(lambda d: d.__setitem__("char_start", [0, 7])),
                             r"do not tile the 8 characters"),
    "documents overlap in steps": (_edit_docs(lambda d: d.__setitem__("step_start", [0, 4])), r"tile the 6 steps"),
    "a document of float bounds": (_edit_docs(lambda d: d.__setitem__("char_end", [6.0, 8.0])), r"not integers"),
    "a document without a name column": (_edit_docs(lambda d: d.__setitem__("title", d.pop("name"))),
                                         r"lacks the column 'name'"),
    "documents count": (_edit_manifest(lambda m: m.update(documents=1)), r"2 documents but the manifest says 1"),
    "steps a string": (_edit_manifest(lambda m: m.update(steps="6")), r"no valid steps"),
    "encoder kind": (_edit_manifest(lambda m: m.update(encoder={"kind": "bpe"})), r"malformed encoder"),
    "loss kind": (_edit_manifest(lambda m: m.update(loss={"kind": "x", "mean_nats": 1})), r"malformed loss"),
    "loss file gone": (lambda out: (out / "loss.npy").unlink(), r"loss.npy is missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_steps_spans_and_documents_are_one_line_on_open(tmp_path, case):
    out = write_documents_run(tmp_path / "r")
    damage, message = DAMAGE[case]
    damage(out)
    with pytest.raises(RnnscopeError, match=message) as err:
        store.open_run(out)
    assert "\n" not in str(err.value)


def test_the_writer_refuses_steps_it_would_not_read(tmp_path):
    with pytest.raises(RnnscopeError, match="in order"):
        write_documents_run(tmp_path / "r", spans=SPANS[[0, 2, 1, 3, 4, 5]])
    with pytest.raises(RnnscopeError, match="5 ids for 6 steps"):
        write_documents_run(tmp_path / "r", ids=IDS[:5])
    assert not any(tmp_path.iterdir())


def test_the_writer_lays_out_what_the_reader_checks(tmp_path):
    out = write_run(tmp_path / "r")
    run = store.open_run(out)
    np.testing.assert_array_equal(run["rnn.l0.h"], np.arange(18, dtype=np.float32).reshape(6, 3))
    assert run.manifest["text"]["sha256"] == hashlib.sha256((out / "text.txt").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_nan_and_inf_rows_are_written_as_they_are(tmp_path):
    rows = np.array([[np.nan, np.inf, -np.inf]] * len(TEXT), np.float32)
    run = store.open_run(write_run(tmp_path / "r", rows=rows))
    got = np.asarray(run["rnn.l0.c"])
    assert np.isnan(got[:, 0]).all() and (got[:, 1] == np.inf).all() and (got[:, 2] == -np.inf).all()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replacing_a_run_leaves_one_whole_run_and_nothing_beside_it(tmp_path, monkeypatch, exchange):
    write_run(tmp_path / "r")
    if not exchange:        # a kernel or file system without RENAME_EXCHANGE
        monkeypatch.setattr(W, "_exchange", lambda a, b: False)
    write_run(tmp_path / "r", "xyz\r\n", overwrite=True)
    assert store.open_run(tmp_path / "r").text == "xyz\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_swap_killed_half_way_gets_the_old_run_put_back(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    old = handmade_v1_run(tmp_path / f".r.partial-{proc.pid}-abc.old")     # moved aside, then the kill
    said = []
    store.clean_stale(tmp_path / "r", log=said.append)
    assert store.open_run(tmp_path / "r").text == TEXT and not old.exists() and "restored" in said[0]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def dies(p):
        p.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        store.atomic_write(target, dies)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    store.atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("key", ["rnn.l0.c", "l0.h", "encoder.lstm.l1_reverse.grad_h", "body.1.l0.h"])
def test_the_key_grammar_takes_pytorch_names(key):
    assert store.split_key(key)["kind"] == key.rsplit(".", 1)[1]


@pytest.mark.parametrize("key", ["../x.l0.h", "a/b.l0.h", "rnn.l0.h\0", "rnn..l0.h", ".l0.h", "rnn.l0.", "rnn.h",
                                 "rnn.l0.h/../../x", 7])
def test_the_key_grammar_refuses_anything_path_like(key):
    with pytest.raises(RnnscopeError, match="not a state key"):
        store.split_key(key)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", "a\0b", ""])
def test_inside_refuses_paths_that_leave_the_run(tmp_path, rel):
    with pytest.raises(RnnscopeError, match="leaves the Run"):
        store.inside(tmp_path, rel)


def test_a_table_that_breaks_its_schema_is_never_written(tmp_path):
    out = write_run(tmp_path / "r")
    frame = pd.DataFrame({"key": ["rnn.l0.h"], "layer": [0], "kind": ["h"], "slope_per_step": ["steep"],
                          "half_life": [1.0], "fit_r2": [1.0], "lag_to_1pct": [3], "max_lag": [9], "exploding": [False]})
    with pytest.raises(RnnscopeError, match="slope_per_step.*expected float"):
        store.write_table(out, "half_lives", frame)
    assert not (out / "analysis" / "half_lives.parquet").exists()
    store.write_table(out, "half_lives", frame.assign(slope_per_step=0.5))
    pd.testing.assert_frame_equal(store.read_table(out, "half_lives"), frame.assign(slope_per_step=0.5),
                                  check_dtype=False)
    with pytest.raises(RnnscopeError, match="not a table name"):
        store.table_path(out, "../neurons")


def test_the_old_import_paths_still_work():
    from rnnscope.analysis import report
    from rnnscope.probe import Run, open_run
    assert Run is store.Run and open_run is store.open_run
    assert report.read_table is store.read_table and report.write_table is store.write_table


def test_one_step_per_character_is_checked_fast_and_nothing_else_passes_with_it():
    """``check_steps``' fast path takes only a layout every full check accepts: one step per character with
    documents bounded alike; a layout one step off either goes the full way and is refused."""
    import numpy as np
    from rnnscope.store import documents_frame
    from rnnscope.store.format import check_steps
    spans = np.stack([np.arange(10), np.arange(1, 11)], 1).astype(np.int64)
    check_steps(spans, documents_frame(["a", "b"], [0, 4, 10], [0, 4, 10]), 10, "x")
    for chars, steps, sp in (([0, 5, 10], [0, 4, 10], spans),                     # bounds not alike
                             ([0, 4, 10], [0, 4, 10], spans[::-1].copy()),        # steps backwards
                             ([0, 4, 10], [0, 4, 10], np.r_[spans[:9], [[3, 4]]])):  # the last goes back
        with pytest.raises(RnnscopeError):
            check_steps(sp, documents_frame(["a", "b"], chars, steps), 10, "x")
