"""Runs and checkpoints from someone else, and a careless --out: answered with one line; never losing data,
escaping the Run, or hanging.

Every test here goes through the public API (``probe.record``, ``open_run``, ``zoo.load``,
``analysis.report``), so it also ran against the code before the store existed, and failed there.
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import char_model
from rnnscope import probe, zoo
from rnnscope.analysis.report import read_table, write_table
from rnnscope.errors import RnnscopeError
from rnnscope.probe import open_run

TEXT = "if (a) {\n\tb(c, d);\n}\n" * 4


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and " — " in msg, msg
    return msg


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def ck(tiny_vocab):
    return char_model("gru", tiny_vocab, hidden=6)


@pytest.fixture
def run_dir(tmp_path, ck):
    return probe.record(ck, TEXT, tmp_path / "r", progress=False).path


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- data loss -----------------------------------------------------------------------------------

def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, ck):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    before = listing(tmp_path)
    with pytest.raises(RnnscopeError, match="not a Run") as e:
        probe.record(ck, TEXT, thesis, overwrite=True, progress=False)
    one_line(e)
    assert (thesis / "chapter1.tex").read_text() == "years of work" and listing(tmp_path) == before


def test_overwrite_replaces_a_run_or_an_empty_directory_and_leaves_nothing_beside_it(tmp_path, ck):
    (tmp_path / "r").mkdir()
    probe.record(ck, TEXT, tmp_path / "r", overwrite=True, progress=False)
    run = probe.record(ck, TEXT[:30], tmp_path / "r", overwrite=True, progress=False)
    assert len(open_run(tmp_path / "r")) == 30 == len(run)
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_finishing_first_is_neither_lost_nor_a_traceback(tmp_path, ck, overwrite):
    """Another probe writes the same --out while this one runs (its loss function runs mid-stream)."""
    other = {}

    def loss_that_lets_another_writer_in(output, targets):
        if not other:
            other["run"] = probe.record(char_model("gru", ck.vocab, hidden=6), TEXT[:20], tmp_path / "r",
                                        progress=False)
        return nn.functional.cross_entropy(output[0, : len(targets)], targets, reduction="none")
    if overwrite:
        run = probe.record(ck, TEXT, tmp_path / "r", overwrite=True, loss=loss_that_lets_another_writer_in,
                           progress=False)
        assert len(run) == len(TEXT)                            # replaced whole, atomically
    else:
        with pytest.raises(RnnscopeError, match="already exists.*another process") as e:
            probe.record(ck, TEXT, tmp_path / "r", loss=loss_that_lets_another_writer_in, progress=False)
        one_line(e)
        assert len(open_run(tmp_path / "r")) == 20              # the other writer's Run is intact
    assert [p.name for p in tmp_path.iterdir()] == ["r"]      # no .old-PID, no .partial-PID


def test_partials_of_killed_probes_are_removed_and_reported(tmp_path, ck, capsys):
    pid = dead_pid()
    stale = tmp_path / f".r.partial-{pid}"
    (stale / "states").mkdir(parents=True)
    (stale / "states" / "rnn.l0.h.npy").write_bytes(b"half")
    mine = tmp_path / f".other.partial-{pid}"                   # another output's: not ours to touch
    mine.mkdir()
    probe.record(ck, TEXT, tmp_path / "r", progress=False)
    assert not stale.exists() and mine.exists()
    assert f".r.partial-{pid}" in capsys.readouterr().out


def test_a_really_killed_probe_is_cleaned_up_by_the_next(tmp_path, ck):
    script = (f"import sys, os, signal; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from conftest import char_model\nfrom rnnscope import probe\nfrom rnnscope.zoo import Vocab\n"
              "from torch import nn\n"
              "def loss(o, t):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"ck = char_model('gru', Vocab({ck.vocab.chars!r}), hidden=6)\n"
              f"probe.record(ck, {TEXT!r}, {str(tmp_path / 'r')!r}, loss=loss, progress=False)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".r.partial"]
    probe.record(ck, TEXT, tmp_path / "r", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize("case", ["file", "symlink", "dot", "under_file", "dangling_symlink"])
def test_out_that_is_not_a_place_for_a_run_is_one_line_and_nothing_written(tmp_path, ck, monkeypatch, case):
    (tmp_path / "f.txt").write_text("keep")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path / "d")
    out = {"file": tmp_path / "f.txt", "symlink": tmp_path / "link", "dot": ".",
           "under_file": tmp_path / "f.txt" / "run", "dangling_symlink": tmp_path / "dangling"}[case]
    before = listing(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(RnnscopeError) as e:
            probe.record(ck, TEXT, out, overwrite=overwrite, progress=False)
        one_line(e)
    assert listing(tmp_path) == before and (tmp_path / "f.txt").read_text() == "keep"


# ---- reads and writes stay inside the Run ---------------------------------------------------------

def test_a_manifest_key_that_climbs_out_of_the_run_is_refused(run_dir):
    outside = run_dir.parent / "secret.npy"
    np.save(outside, np.zeros((len(TEXT), 6), np.float16))
    m = json.loads((run_dir / "manifest.json").read_text())
    m["keys"]["../../secret"] = dict(m["keys"]["rnn.l0.h"], file="states/../../secret.npy")
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RnnscopeError, match="not a state key") as e:
        open_run(run_dir)
    one_line(e)


def test_a_state_file_linked_to_outside_the_run_is_refused(run_dir):
    outside = run_dir.parent / "elsewhere.npy"
    os.replace(run_dir / "states" / "rnn.l0.h.npy", outside)
    (run_dir / "states" / "rnn.l0.h.npy").symlink_to(outside)
    with pytest.raises(RnnscopeError, match="outside the Run") as e:
        open_run(run_dir)
    one_line(e)


def test_tables_are_never_written_through_a_link(run_dir, tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    (run_dir / "analysis").symlink_to(target)
    frame = pd.DataFrame({"step": [0, 1], "rnn.l0.grad_h": [1.0, 2.0]})
    with pytest.raises(RnnscopeError, match="symbolic link") as e:
        write_table(open_run(run_dir), "grad_norms", frame)
    one_line(e)
    assert not any(target.iterdir())


# ---- a Run is checked on open, one line per problem -----------------------------------------------

def _manifest(run_dir, change):
    m = json.loads((run_dir / "manifest.json").read_text())
    change(m)
    (run_dir / "manifest.json").write_text(json.dumps(m))


def _rewrite_npy(path, array, allow_pickle=False):
    path.unlink()
    np.save(path, array, allow_pickle=allow_pickle)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


T, U = len(TEXT), 6
BROKEN = {
    "manifest not UTF-8": (lambda r: (r / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "manifest a list": (lambda r: (r / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    "newer format": (lambda r: _manifest(r, lambda m: m.update(format_version=99)), "newer than this rnnscope"),
    "version a string": (lambda r: _manifest(r, lambda m: m.update(format_version="1")), "format_version"),
    "keys missing": (lambda r: _manifest(r, lambda m: m.pop("keys")), "lacks keys"),
    "keys a list": (lambda r: _manifest(r, lambda m: m.update(keys=["rnn.l0.h"])), "lacks keys"),
    "units a string": (lambda r: _manifest(r, lambda m: m["keys"]["rnn.l0.h"].update(units="6")), "malformed"),
    "text missing": (lambda r: _manifest(r, lambda m: m.pop("text")), "text.chars"),
    "card_name a number": (lambda r: _manifest(r, lambda m: m["model"].update(card_name=7)), "card_name"),
    "module not an object": (lambda r: _manifest(r, lambda m: m["model"]["modules"].update(rnn=5)), "modules"),
    "chars a float": (lambda r: _manifest(r, lambda m: m["text"].update(chars=float(T))), "text.chars"),
    "dtype int8": (lambda r: _manifest(r, lambda m: m.update(dtype="int8")), "dtype"),
    "states int8": (lambda r: _rewrite_npy(r / "states/rnn.l0.h.npy", np.zeros((T, U), np.int8)), "holds int8"),
    "states complex": (lambda r: _rewrite_npy(r / "states/rnn.l0.h.npy", np.zeros((T, U), np.complex64)),
                       "holds complex64"),
    "states objects": (lambda r: _rewrite_npy(r / "states/rnn.l0.h.npy", np.array([[None] * U] * T), True),
                       "holds object"),
    "states 1-D": (lambda r: _rewrite_npy(r / "states/rnn.l0.h.npy", np.zeros(T * U, np.float16)), "shape"),
    "states too short": (lambda r: _rewrite_npy(r / "states/rnn.l0.h.npy", np.zeros((T - 1, U), np.float16)),
                         "shape"),
    "header longer than file": (lambda r: _truncate(r / "states/rnn.l0.h.npy", 40), "not a readable .npy"),
    "data shorter than header says": (lambda r: _truncate(r / "states/rnn.l0.h.npy", (r / "states/rnn.l0.h.npy").stat().st_size - 2),
                                      "bytes, expected"),
    "text file missing": (lambda r: (r / "text.txt").unlink(), "missing"),
    "text shorter": (lambda r: (r / "text.txt").write_text(TEXT[:-3]), "characters but the manifest says"),
    "text changed": (lambda r: (r / "text.txt").write_text(TEXT.upper()), "checksum"),
    "text not UTF-8": (lambda r: (r / "text.txt").write_bytes(b"\xff" * T), "not UTF-8"),
    "text a FIFO": (lambda r: ((r / "text.txt").unlink(), os.mkfifo(r / "text.txt")), "not a regular file"),
    "loss missing": (lambda r: (r / "loss.npy").unlink(), "loss.npy is missing"),
    "loss shorter": (lambda r: _rewrite_npy(r / "loss.npy", np.zeros(T - 5, np.float32)), "shape"),
    "units table of the wrong types": (lambda r: pd.DataFrame({"unit": [1]}).to_parquet(r / "units.parquet"),
                                       "lacks the column|holds"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_damaged_run_is_refused_on_open_in_one_line(run_dir, case):
    damage, expect = BROKEN[case]
    damage(run_dir)
    with pytest.raises(RnnscopeError, match=expect) as e:
        open_run(run_dir)
    one_line(e)


def test_analysis_tables_are_checked_against_their_schema_on_read(run_dir):
    run = open_run(run_dir)
    (run_dir / "analysis").mkdir()
    pd.DataFrame({"unit": ["<img src=x onerror=alert(1)>"], "key": ["rnn.l0.h"], "layer": [0], "kind": ["h"],
                  "index": [0], "feature": ["f"], "metric": ["auc"], "direction": [1], "score": [0.5],
                  "heldout_score": [0.5], "q_value": [0.1], "strength": [0.1]}).to_parquet(
        run_dir / "analysis" / "neurons.parquet")
    with pytest.raises(RnnscopeError, match="'<img .*is not a state unit") as e:
        read_table(run, "neurons")
    one_line(e)
    pd.DataFrame({"step": ["0"], "rnn.l0.grad_h": [1.0]}).to_parquet(run_dir / "analysis" / "grad_norms.parquet")
    with pytest.raises(RnnscopeError, match="column 'step' holds (large_)?string, expected integer"):
        read_table(run, "grad_norms")


# ---- the text, byte for byte ----------------------------------------------------------------------

def test_cr_and_crlf_are_stored_and_read_back_as_they_are(tmp_path, ck):
    text = "a(b);\r\nc;\rd\n" * 3
    vocab = zoo.Vocab("".join(sorted(set(text))))
    run = probe.record(char_model("lstm", vocab, hidden=4), text, tmp_path / "r", progress=False)
    stored = (run.path / "text.txt").read_bytes()
    assert stored == text.encode() and open_run(run.path).text == text
    assert run.manifest["text"]["sha256"] == hashlib.sha256(stored).hexdigest()


# ---- record's own messages; NaN stays NaN ---------------------------------------------------------

def test_gradients_of_a_one_character_text_are_a_clear_message(tmp_path, ck):
    with pytest.raises(RnnscopeError, match="gradients need at least two characters") as e:
        probe.record(ck, "a", tmp_path / "r", grad=True, progress=False)
    one_line(e)
    assert not any(tmp_path.iterdir())


def test_a_model_producing_nan_is_recorded_as_nan_and_flagged(tmp_path, ck):
    with torch.no_grad():
        ck.model.rnn.weight_hh_l0.fill_(float("nan"))
    run = probe.record(ck, TEXT, tmp_path / "r", grad=True, dtype="float32", progress=False)
    again = open_run(run.path)
    assert again.manifest["nonfinite"] is True and again.nonfinite["rnn.l0.h"] == T * U
    for key in ("rnn.l0.h", "rnn.l1.h", "rnn.l0.grad_h"):
        assert np.isnan(np.asarray(again[key])).all(), key        # not 0, not dropped
    assert np.isnan(np.asarray(again.loss)).all()
    assert again.units.query("key == 'rnn.l0.h'")[["mean", "std", "min", "max"]].isna().all().all()


# ---- checkpoint cards -----------------------------------------------------------------------------

def _card(ck_dir, change):
    card = json.loads((ck_dir / "card.json").read_text())
    change(card)
    (ck_dir / "card.json").write_text(json.dumps(card))


CARDS = {
    "hidden a string": (lambda c: c["architecture"].update(hidden="16"), "hidden must be a whole number"),
    "hidden a fraction": (lambda c: c["architecture"].update(hidden=16.7), "hidden must be a whole number"),
    "layers a bool": (lambda c: c["architecture"].update(layers=True), "layers must be a whole number"),
    "layers 0": (lambda c: c["architecture"].update(layers=0), "layers must be >= 1"),
    "dropout 5": (lambda c: c["architecture"].update(dropout=5), r"dropout must be a number in \[0, 1\)"),
    "hidden 100000 (160 GB)": (lambda c: c["architecture"].update(hidden=100000), "hidden must be >= 1 and <="),
    "parameters beyond the cap": (lambda c: c["architecture"].update(hidden=16000, layers=40), "parameters"),
    "vocab a list": (lambda c: c.update(vocab=list(c["vocab"])), "vocabulary must be a non-empty string"),
    "vocab shorter than vocab_size": (lambda c: c.update(vocab=c["vocab"][:-1]), "vocab_size"),
    "no weights_sha256": (lambda c: c.pop("weights_sha256"), "no valid weights_sha256.*verify=False"),
    "empty weights_sha256": (lambda c: c.update(weights_sha256=""), "no valid weights_sha256"),
    "architecture a string": (lambda c: c.update(architecture="lstm"), "lacks a valid architecture"),
}


@pytest.mark.parametrize("case", list(CARDS))
def test_a_bad_card_is_one_line_before_anything_is_built(tiny_checkpoint, case):
    change, expect = CARDS[case]
    _card(tiny_checkpoint, change)
    start = time.perf_counter()
    with pytest.raises(RnnscopeError, match=expect) as e:
        zoo.load(tiny_checkpoint)
    one_line(e)
    assert time.perf_counter() - start < 5          # nothing large was allocated


def test_loading_without_a_checksum_needs_an_explicit_verify_false(tiny_checkpoint):
    _card(tiny_checkpoint, lambda c: c.pop("weights_sha256"))
    ck = zoo.load(tiny_checkpoint, verify=False)
    assert ck.model.rnn.hidden_size == 16


def test_weight_shapes_are_checked_from_the_header_before_the_model_is_built(tiny_checkpoint):
    """A card claiming a 2 x 4096 LSTM (270M parameters, a GB to build) over 2 x 16 weights is refused
    from the safetensors header alone, in far less time than building that model would take."""
    _card(tiny_checkpoint, lambda c: c["architecture"].update(hidden=4096))
    start = time.perf_counter()
    with pytest.raises(RnnscopeError, match=r"does not match architecture lstm 2x4096.*\[64, 8\]") as e:
        zoo.load(tiny_checkpoint, verify=False)
    one_line(e)
    assert time.perf_counter() - start < 1.0


def test_embedding_rows_must_match_the_vocabulary(tiny_checkpoint, tiny_vocab):
    bare = tiny_checkpoint / "weights.safetensors"
    with pytest.raises(RnnscopeError, match="embed.weight is") as e:
        zoo.load(bare, arch="lstm", vocab=tiny_vocab.chars[:-2], embed=8, hidden=16, layers=2)
    one_line(e)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_weights_that_are_not_a_regular_file_never_hang(tiny_checkpoint, tiny_vocab, kind):
    w = tiny_checkpoint / "weights.safetensors"
    w.unlink()
    w.mkdir() if kind == "directory" else os.mkfifo(w)
    with pytest.raises(RnnscopeError, match="not a regular file") as e:
        zoo.load(tiny_checkpoint)
    one_line(e)
    if kind == "fifo":
        with pytest.raises(RnnscopeError, match="not a regular file"):
            zoo.load(w, arch="lstm", vocab=tiny_vocab.chars, embed=8, hidden=16, layers=2)


def test_a_card_that_is_a_fifo_never_hangs(tiny_checkpoint):
    (tiny_checkpoint / "card.json").unlink()
    os.mkfifo(tiny_checkpoint / "card.json")
    with pytest.raises(RnnscopeError, match="not a regular file"):
        zoo.load(tiny_checkpoint)


def test_save_then_load_still_round_trips(tmp_path, tiny_vocab):
    model = zoo.CharModel(zoo.Architecture("gru", len(tiny_vocab), 4, 5, 1))
    zoo.save(model, tiny_vocab, {"name": "x"}, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["card.json", "weights.safetensors"]
    back = zoo.load(tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.model.state_dict().values()))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(RnnscopeError, match="does not match architecture"):
        zoo.load(tmp_path / "odd.safetensors", arch="gru", vocab=tiny_vocab.chars, hidden=5, layers=1)
