"""Bad input to `record` and the watch log: each class (Run format 2 arrays, encoders, losses, models, watch blocks) is one
line naming the problem and the fix, exit 2 from the command line, and nothing half-written."""
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rnnscope.cli import main
from rnnscope.dashboards.steps import Documents
from rnnscope.errors import RnnscopeError
from rnnscope.probe import record
from rnnscope.probe.watch import Watch
from rnnscope.store import open_run
from rnnscope.store.watchlog import open_watch_log

DOCS = {"<img src=x onerror=alert(1)>$$x$$": "the cat sat on the mat\n", "doc\x1b[31m\ntwo": "and the dog ran\n"}


class WordLM(nn.Module):
    def __init__(self, vocab=128):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(vocab, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


def words(text):
    found = list(re.finditer(r"\S+", text))
    return torch.tensor([len(m.group()) for m in found]), np.array([m.span() for m in found])


def one_line(err) -> str:
    line = str(err.value)
    assert "\n" not in line and " — " in line, line
    return line


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    return record(WordLM(), DOCS, tmp_path / "run", encode=words, loss=None, progress=False).path


def refused_by_record(tmp_path, pattern, encode=words, model=None, **kw):
    out = tmp_path / "out"
    with pytest.raises(RnnscopeError) as err:
        record(model or WordLM(), DOCS, out, encode=encode, progress=False, **kw)
    assert pattern in one_line(err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))     # nothing half-written beside it either


def test_crafted_run_files_are_refused_in_one_line(run_dir, tmp_path):
    def crafted(name, change):
        d = tmp_path / name
        shutil.copytree(run_dir, d)
        change(d)
        with pytest.raises(RnnscopeError) as err:
            open_run(d)
        return one_line(err)

    def manifest(d, **fields):
        m = json.loads((d / "manifest.json").read_text())
        m["text"].update(fields)
        (d / "manifest.json").write_text(json.dumps(m))
    # a character count no disk holds once made the read itself overflow (OverflowError, not one line)
    assert "characters but the manifest says" in crafted("huge", lambda d: manifest(d, chars=2 ** 62))
    # every step without text: the Run opened, then analysis failed deep inside numpy
    no_text = crafted("no-text", lambda d: np.save(d / "spans.npy", np.full((len(open_run(run_dir)), 2), -1)))
    assert "with no step that reads its text" in no_text and "<img src=x" in no_text
    assert "(0, 3) at step 1 before the previous" in crafted(
        "back", lambda d: np.save(d / "spans.npy", open_run(run_dir).spans[[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]))
    assert "holds float64, expected int64" in crafted(
        "float", lambda d: np.save(d / "ids.npy", open_run(run_dir).ids.astype(float)))


def test_a_bad_encoder_is_one_line_and_writes_nothing(tmp_path):
    def raises(text):
        return 1 / 0
    refused_by_record(tmp_path, "the encoder failed on a text of 23 characters: ZeroDivisionError", encode=raises)
    refused_by_record(tmp_path, "none with a span in it", encode=lambda t: (torch.ones(2, dtype=torch.long),
                                                                             np.full((2, 2), -1)))
    # an id beyond the embedding was an IndexError from deep inside torch ("index out of range in self")
    refused_by_record(tmp_path, "the encoder gave the id 1,003 but the model's embedding holds ids 0..127",
                      encode=lambda t: (words(t)[0] + 1000, words(t)[1]))
    # uint64 ids: torch cannot compare them ("lt_cpu" not implemented for 'UInt64'), an internal error
    refused_by_record(tmp_path, "the encoder returned the id 18,446,744,073,709,551,615, beyond any vocabulary",
                      encode=lambda t: (np.full(len(words(t)[0]), 2 ** 64 - 1, np.uint64), words(t)[1]))


def test_a_model_that_fails_on_the_ids_is_one_line(tmp_path):
    # a bare nn.LSTM given LongTensor ids: torch's dtype error, said as the model failing on the ids
    refused_by_record(tmp_path, "the model failed on the encoder's ids [1, 2]: RuntimeError", model=nn.LSTM(4, 5))


def test_a_loss_without_a_gradient_is_one_line_with_grad(tmp_path):
    # a loss that does not depend on the output: backward() failed inside autograd (exit 3, internal error)
    refused_by_record(tmp_path, "the loss does not depend on the model's output",
                      loss=lambda output, ids: torch.ones(len(ids)), grad=True)


def test_hostile_document_names_stay_on_one_line(run_dir, capsys):
    with pytest.raises(RnnscopeError) as err:
        Documents(open_run(run_dir).documents).find("99")
    assert r"doc\x1b[31m\ntwo" in one_line(err)
    assert main(["export", str(run_dir), "--unit", "rnn.l0.h:0", "--document", "nope",
                 "--out", str(run_dir.parent / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and err.startswith("rnnscope: error: the run has no document")
    assert not (run_dir.parent / "x.html").exists()
    assert "\n" not in str(RnnscopeError("a\nb\u2028c", "d\re")) == r"a\nb\u2028c — d\re"


def test_a_kill_after_steps_went_back_keeps_the_watch_log(tmp_path):
    """Training resumed from an earlier checkpoint writes a block whose name sorts before older ones; torn by a
    kill, it made the whole log unreadable ('not the last one') and the next Watch on it failed too."""
    torch.manual_seed(0)
    rnn, x, log = nn.GRU(3, 4, batch_first=True), torch.randn(2, 5, 3), tmp_path / "log"

    def train(steps):
        with Watch(rnn, out=log, every=1, flush_every=2) as w:
            for step in steps:
                with w.step(step):
                    loss = rnn(x)[0].pow(2).mean()
                    loss.backward()
                    w.loss(loss)
                rnn.zero_grad()
    train(range(4))
    blocks = sorted((log / "blocks").iterdir())
    for i, b in enumerate(blocks):          # written in name order, a second apart
        os.utime(b, ns=(10 ** 18 + i * 10 ** 9,) * 2)
    train([0, 1])
    resumed = log / "blocks" / "000000000000-000000000001.1.arrow"
    resumed.write_bytes(resumed.read_bytes()[:40])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert open_watch_log(log).steps.step.tolist() == [0, 1, 2, 3]
        train([4])
    assert any("torn" in str(w.message) for w in seen)
    assert open_watch_log(log).steps.step.tolist() == [0, 1, 2, 3, 4]
    # a bad block written before others is still an error, not silently dropped
    first = log / "blocks" / blocks[0].name
    first.write_bytes(b"junk")
    os.utime(first, ns=(10 ** 18,) * 2)
    with pytest.raises(RnnscopeError) as err:
        open_watch_log(log)
    assert "is unreadable" in one_line(err) and "not the last one" in str(err.value)


@pytest.mark.parametrize("junk", ["not json", "[" * 100000, ""])
def test_a_damaged_watch_json_is_said_as_the_logs_problem(tmp_path, capsys, junk):
    # it was taken for "not an rnnscope run (no manifest.json)", and deep nesting escaped as a RecursionError
    (tmp_path / "log" / "blocks").mkdir(parents=True)
    (tmp_path / "log" / "watch.json").write_text(junk)
    for argv in (["analyze", str(tmp_path / "log")], ["export", str(tmp_path / "log"), "--out", str(tmp_path / "x.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "watch.json is not JSON — the log is damaged" in err, err
    assert not (tmp_path / "x.png").exists()
