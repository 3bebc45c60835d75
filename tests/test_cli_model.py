"""`rnnscope probe --model SPEC`: a user's own model from the command line; every bad SPEC one line, exit 2."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from reference import unrolled
from rnnscope.cli import main
from test_models_spec import SPEC_FILE

TEXT = "int main(void) {\n  return x + 1;\n}\n"


@pytest.fixture
def here(tmp_path):
    (tmp_path / "mine.py").write_text(SPEC_FILE.replace("SUBJECT_CLASS", "__import__('rnnscope').Subject"))
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "loss.py").write_text("def per_step(output, ids):\n    return -output[0, :, 1]\n")
    return tmp_path


def refused(capsys, pattern, *argv):
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnscope: error: "), err
    assert pattern in err[0], err[0]


def test_every_bad_model_spec_is_one_line_and_writes_nothing(here, capsys):
    text, out = here / "t.txt", here / "run"
    (here / "broken.py").write_text("x = 1\nimport no_such_module_at_all\n")
    (here / "notes.txt").write_text("x")
    torch.save({"w": torch.zeros(1)}, here / "weights.pt")
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(2, 2))), str(here / "mlp.pt"))
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Embedding(128, 3), nn.GRU(3, 4))), str(here / "gru.pt"))
    for pattern, model, *more in [
            ("does not exist", here / "absent.py:build"),
            ("is not a .py file", here / "notes.txt:build"),
            ("broken.py line 2: No module named 'no_such_module_at_all'", here / "broken.py:build"),
            ("mine.py has no attribute 'nope'", here / "mine.py:nope"),
            ("is a int, not a function", here / "mine.py:NOT_A_FUNCTION"),
            ("no nn.RNN / nn.LSTM / nn.GRU module", here / "mine.py:no_rnn"),
            ("holds no nn.RNN / nn.LSTM / nn.GRU module", here / "mlp.pt"),
            ("is not a TorchScript archive", here / "weights.pt"),
            ("comes with no encoder — pass --encoder", here / "gru.pt"),
            ("has no attribute 'nope'", here / "gru.pt", "--encoder", f"{here / 'mine.py'}:nope"),
            ("no recurrent module 'rnn' — choose from 'enc.rnn'", here / "mine.py:build", "--modules", "rnn"),
            ("lacks 'embed.weight'", f"{here / 'weights.pt'}@{here / 'mine.py'}:build"),
            ("loss.py has no attribute 'nope'", here / "mine.py:build", "--loss", f"{here / 'loss.py'}:nope")]:
        refused(capsys, pattern, "probe", "--model", model, "--text", text, "--out", out, *more)
    refused(capsys, "two models given", "probe", "zoo:gru-linux", "--model", here / "mine.py:build",
            "--text", text, "--out", out)
    refused(capsys, "no model given", "probe", "--text", text, "--out", out)
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--model", f"{here / 'mine.py'}:build", "--modules", "a b", "--text", str(text),
              "--out", str(out)])
    assert exit_.value.code == 2 and "is not a module name" in capsys.readouterr().err
    assert not out.exists()


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_spec_file_and_a_torchscript_archive_probed_from_the_command_line(here):
    from rnnscope.probe import open_run
    from rnnscope.probe import specs as models
    _cli("probe", "--model", f"{here / 'mine.py'}:build", "--text", here / "t.txt", "--out", here / "run",
         "--dtype", "float32", "--loss", "none")
    run = open_run(here / "run")
    model, encode = models.call(models.resolve(f"{here / 'mine.py'}:build", "--model"), "build")
    _, ref, _ = unrolled(model.enc.rnn, model.embed(encode(TEXT)).detach())
    assert run.text == TEXT and run.loss is None
    for layer in (0, 1):
        got = torch.from_numpy(run[f"enc.rnn.l{layer}.h"][:].copy()).double()
        assert (got - ref[(layer, False, "h")][0]).abs().max() < 1e-5

    torch.jit.save(torch.jit.script(model.eval()), str(here / "tagger.pt"))
    out = _cli("probe", here / "tagger.pt", "--encoder", f"{here / 'mine.py'}:encode_factory", "--text",
               here / "t.txt", "--out", here / "run2", "--dtype", "float32", "--grad", "--loss",
               f"{here / 'loss.py'}:per_step", "--modules", "enc.rnn")
    assert "wrote" in out
    archived = open_run(here / "run2")
    for key in ("enc.rnn.l0.h", "enc.rnn.l1.h"):
        assert (archived[key][:] == run[key][:]).all()           # the archive's states are the eager model's
    assert "enc.rnn.l1.grad_h" in archived.keys()


def test_a_directory_of_documents_with_the_state_reset_or_carried(here, capsys):
    from rnnscope.probe import open_run
    docs = here / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("x = 1;\n")
    (docs / "b.txt").write_text("x = 1;\n")
    spec = f"{here / 'mine.py'}:build"
    for out, carry in (("reset", []), ("carried", ["--carry"])):
        assert main(["probe", "--model", spec, "--text", str(docs), "--out", str(here / out), "--loss", "none",
                     "--dtype", "float32", *carry]) == 0
    reset, carried = open_run(here / "reset"), open_run(here / "carried")
    assert list(reset.documents["name"]) == ["a.txt", "b.txt"]
    h, hc = reset["enc.rnn.l1.h"][:], carried["enc.rnn.l1.h"][:]
    assert (h[:7] == h[7:]).all()                 # the same text from a fresh state: the same states
    assert (hc[:7] == h[:7]).all() and not (hc[7:] == h[7:]).all()
    assert "wrote" in capsys.readouterr().out
    refused(capsys, "--max-chars cuts one text file", "probe", "--model", spec, "--text", docs, "--out",
            here / "x", "--max-chars", "3")
