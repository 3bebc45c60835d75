"""Frames from the command line: the README's `rnnscope probe --frames` example run as written (in this
process, from the repository root, its Run under tmp_path), the Run checked against the model's own
cell (bit for bit) and a float64 unrolled loop with autograd (the gradients), the planted unit found by
`analyze --features`, `export` and `serve` on it; and every bad frames file refused in one line."""
import re
import runpy
import shlex
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.cli import main

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import frames_lstm as example  # noqa: E402

# 4 clips of 60 to 90 frames: a held-out p-value cannot go below 1/74, which is all the warning says
pytestmark = pytest.mark.filterwarnings("ignore::rnnscope.analysis.neurons.CoarseNull")


def readme_commands(example: str = "frames_lstm.py") -> list[str]:
    """The shell lines of the README's block (in "Step loops, cells and attention") that runs ``example``."""
    section = ROOT.joinpath("README.md").read_text().split("## Step loops, cells and attention", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    block = next(b for b in blocks if example in b).replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Every README command but `serve`, run as written; returns the Run's folder and the serve line."""
    root, commands = tmp_path_factory.mktemp("frames_cli"), readme_commands()
    assert [c.split()[:2] for c in commands] == [["python", "examples/frames_lstm.py"], ["rnnscope", "probe"],
                                                 ["rnnscope", "analyze"], ["rnnscope", "export"], ["rnnscope", "serve"]]
    assert "--dtype float32" in commands[1] and "--grad" in commands[1]
    mp = pytest.MonkeyPatch()
    try:
        run_commands(commands[:-1], root, mp)
    finally:
        mp.undo()
    return root / "runs", commands[-1]


def run_commands(commands: list[str], root: Path, mp: pytest.MonkeyPatch) -> None:
    """README lines as written, from the repository root, ``runs/`` under ``root``: ``python x.py`` by
    runpy, ``rnnscope ...`` by the CLI's main in this process."""
    mp.chdir(ROOT)
    for line in commands:
        args = shlex.split(line.replace("runs/", f"{root}/runs/"))
        if args[0] == "python":
            mp.setattr(sys, "argv", args[1:])
            runpy.run_path(args[1], run_name="__main__")
        else:
            assert main(args[1:]) == 0, line


def test_the_states_are_the_cells_own_outputs_bit_for_bit(readme):
    runs, _ = readme
    run, clips = rs.open_run(runs / "clips"), np.load(runs / "clips.npz")
    stamps = np.load(runs / "clips.times.npz")
    assert run.frames and run.documents["name"].tolist() == list(clips.files) == [f"clip{i}" for i in range(4)]
    assert np.array_equal(run.times, np.concatenate([stamps[k] for k in clips.files]))
    model = example.build()
    at = 0
    for name in clips.files:
        h = c = torch.zeros(1, example.UNITS)
        hs, cs = [], []
        with torch.no_grad():
            for x in torch.from_numpy(clips[name]):
                h, c = model.cell(x[None], (h, c))
                hs.append(h[0].numpy())
                cs.append(c[0].numpy())
        T = len(hs)
        assert run["cell.l0.h"].dtype == np.float32
        assert np.array_equal(run["cell.l0.h"][at:at + T], np.stack(hs))
        assert np.array_equal(run["cell.l0.c"][at:at + T], np.stack(cs))
        at += T
    assert at == len(run)


def test_the_gradients_equal_a_float64_unrolled_loop(readme):
    runs, _ = readme
    run, clips, model = rs.open_run(runs / "clips"), np.load(runs / "clips.npz"), example.build()
    cell, head = nn.LSTMCell(example.FEATURES, example.UNITS).double(), nn.Linear(example.UNITS, 2).double()
    cell.load_state_dict(model.cell.state_dict())
    head.load_state_dict(model.head.state_dict())
    at, worst, gates = 0, 0.0, 0.0
    for name in clips.files:
        x = torch.from_numpy(clips[name]).double()
        h = c = torch.zeros(1, example.UNITS, dtype=torch.float64)
        hs, fs = [], []
        for t in range(len(x)):
            pre = x[None, t] @ cell.weight_ih.T + h @ cell.weight_hh.T + cell.bias_ih + cell.bias_hh
            fs.append(torch.sigmoid(pre.chunk(4, 1)[1]).detach()[0])
            h, c = cell(x[None, t], (h, c))
            h.retain_grad()
            hs.append(h)
        sum((head(h)[0, 0] - x[t, 1]) ** 2 for t, h in enumerate(hs)).backward()
        want = torch.stack([h.grad[0] for h in hs]).numpy()
        got = np.asarray(run["cell.l0.grad_h"][at:at + len(x)], np.float64)
        worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
        gates = max(gates, np.abs(np.asarray(run["cell.l0.f"][at:at + len(x)], np.float64) - torch.stack(fs).numpy()).max())
        at += len(x)
    assert worst < 1e-6 and gates < 1e-6, (worst, gates)


def test_analyze_finds_the_unit_that_follows_channel_0(readme):
    runs, _ = readme
    neurons = pd.read_parquet(runs / "clips" / "analysis" / "neurons.parquet")
    for feature, metric, floor in (("channel0_up", "auc", 0.999), ("channel0", "pearson", 0.98)):
        rows = neurons[neurons["feature"] == feature]
        planted = rows[rows["unit"].isin(["cell.l0.h:0", "cell.l0.c:0", "cell.l0.g:0"])]
        assert (planted["metric"] == metric).all() and planted["selected"].all()
        # every unit reads the channel through its random input weights; the planted one follows it most
        assert planted["heldout_score"].max() > floor
        assert planted["heldout_score"].max() >= rows.drop(planted.index)["heldout_score"].abs().max()
    feats = pd.read_parquet(runs / "clips" / "analysis" / "features.parquet")      # the user's values, per frame
    clips = np.load(runs / "clips.npz")
    assert np.array_equal(feats["channel0"], np.concatenate([clips[k][:, 0] for k in clips.files]).astype(np.float64))
    page = (runs / "clips" / "unit.html").read_text()
    assert "unit_line" in page and "heatmap" in page


def test_serve_answers_on_the_run(readme):
    from browser import served
    runs, line = readme
    assert shlex.split(line)[:3] == ["rnnscope", "serve", "runs/clips"]
    with served(runs / "clips") as (url, proc):
        assert "bokeh" in urllib.request.urlopen(url, timeout=30).read().decode().lower()
        assert proc.poll() is None


def refused(capsys, *args) -> str:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as err:           # argparse's own errors
        rc = err.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rnnscope: error: ") and "\n" not in err and " — " in err, err
    return err


MODEL = f"{ROOT / 'examples' / 'frames_lstm.py'}:build"


def _npy_header(shape, dtype="<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _savez(path, **arrays):
    np.savez(path, **arrays)
    return path


def _link_out(tmp):
    (tmp / "d").mkdir()
    np.save(tmp / "outside.npy", np.zeros((4, 3), np.float32))
    (tmp / "d" / "a.npy").symlink_to(tmp / "outside.npy")
    return tmp / "d"


def _with_text(tmp):
    (tmp / "d").mkdir()
    np.save(tmp / "d" / "a.npy", np.zeros((4, 3), np.float32))
    (tmp / "d" / "notes.txt").write_text("hi")
    return tmp / "d"


def _corrupt(tmp):
    """A compressed .npz whose deflated data is garbage past its array's header."""
    np.savez_compressed(tmp / "f.npz", a=np.arange(3000, dtype=np.float32).reshape(1000, 3))
    with zipfile.ZipFile(tmp / "f.npz") as zf:
        info = zf.infolist()[0]
    data = bytearray((tmp / "f.npz").read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[at:at + 200] = b"\xff" * 200
    (tmp / "f.npz").write_bytes(bytes(data))
    return tmp / "f.npz"


def _raw(name, data: bytes):
    def write(tmp):
        (tmp / name).write_bytes(data)
        return tmp / name
    return write


z = np.zeros
BAD_FILES = [
    ("object", lambda t: _savez(t / "f.npz", a=np.array([None, 1], dtype=object)), "holds object values"),
    ("str", lambda t: _savez(t / "f.npz", a=np.array([["ab", "cd"]])), "holds <U2 values"),
    ("complex", lambda t: _savez(t / "f.npz", a=z((4, 3), np.complex64)), "holds complex64 values"),
    ("nan", lambda t: _savez(t / "f.npz", a=np.where(np.eye(4, 3) > 0, np.nan, 0)), "holds nan at frame 0, feature 0"),
    ("inf", lambda t: _savez(t / "f.npz", a=np.full((2, 3), 1e300)), "not a finite float32"),
    ("rank", lambda t: _savez(t / "f.npz", a=z(5, np.float32)), "shape [5]"),
    ("width", lambda t: _savez(t / "f.npz", a=z((5, 3), np.float32), b=z((5, 2), np.float32)), "'b' has 2 features"),
    ("empty", lambda t: _savez(t / "f.npz", a=z((0, 3), np.float32)), "shape [0, 3]"),
    ("none", lambda t: _savez(t / "f.npz"), "holds no arrays"),
    ("huge", _raw("f.npy", _npy_header((1 << 20, 1 << 10)) + b"\0" * 64), "past the 268,435,456"),
    ("short", _raw("f.npy", _npy_header((10, 3)) + b"\0" * 12), "is cut short"),
    # forged headers: a negative size (read(-4) would inflate a whole bomb), sizes whose int64 product
    # overflows or wraps to 0, wide values (a longdouble array of as many values is 4x the bytes)
    ("negative", _raw("f.npy", _npy_header((-1, 1)) + b"\0" * 64), "not sizes >= 0"),
    ("two negative", _raw("f.npy", _npy_header((-2, -3)) + b"\0" * 64), "not sizes >= 0"),
    ("overflow", _raw("f.npy", _npy_header((10 ** 30, 3)) + b"\0" * 64), "past the 268,435,456"),
    ("wraps to 0", _raw("f.npy", _npy_header((1 << 32, 1 << 32)) + b"\0" * 64), "past the 268,435,456"),
    ("wide", _raw("f.npy", _npy_header((1, 1 << 28), "<f16") + b"\0" * 64), "(2 GB)"),
    ("extra", _raw("f.npy", _npy_header((2, 3)) + b"\0" * 120), "more data than its header's [2, 3]"),
    ("big int", lambda t: _savez(t / "f.npz", a=np.array([[1 << 24, (1 << 24) + 1]], np.int64)),
     "the integer 16777217 at frame 0, feature 1"),
    ("not npy", _raw("f.npy", b"hello"), "is not a readable .npy array"),
    ("not zip", _raw("f.npz", b"PK not a zip"), "is not an .npz archive"),
    ("corrupt", _corrupt, "cannot be read from the archive"),
    ("link out", _link_out, "leads out of"),
    ("not npy in dir", _with_text, "is not an .npy file"),
    ("suffix", _raw("f.csv", b"1,2,3"), "is neither .npz nor .npy"),
    ("missing", lambda t: t / "nothing.npz", "cannot be read"),
]


@pytest.mark.parametrize("name, make, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_frames_files_are_refused_in_one_line_with_nothing_written(tmp_path, capsys, name, make, message):
    path = make(tmp_path)
    err = refused(capsys, "probe", "--model", MODEL, "--frames", path, "--out", tmp_path / "run")
    assert message in err and not (tmp_path / "run").exists()


def test_bad_times_are_refused(tmp_path, capsys):
    frames = _savez(tmp_path / "f.npz", a=z((4, 3), np.float32), b=z((3, 3), np.float32))
    for times, message in ((dict(a=np.arange(4.0)), "'b' of"), (dict(a=np.arange(4.0), b=[0, 2, 1]), "before the one before"),
                           (dict(a=np.arange(4.0), b=np.arange(3.0), c=[1]), "holds times for 'c'"),
                           (dict(a=np.arange(3.0), b=np.arange(3.0)), "times of float64 [3] for 4 frames")):
        err = refused(capsys, "probe", "--model", MODEL, "--frames", frames, "--times",
                      _savez(tmp_path / "t.npz", **times), "--out", tmp_path / "run")
        assert message in err and not (tmp_path / "run").exists()


def test_flags_that_do_not_go_with_frames_are_refused(tmp_path, capsys, tiny_checkpoint):
    frames = _savez(tmp_path / "f.npz", a=z((4, 3), np.float32))
    (tmp_path / "t.txt").write_text("abc")
    base = ["probe", "--model", MODEL, "--out", tmp_path / "run"]
    for extra, message in ((["--text", tmp_path / "t.txt"], "not allowed with argument"),
                           (["--attention", "cell"], "--frames does not go with --attention"),
                           (["--unk", "?"], "--frames does not go with --unk"),
                           (["--encoder", "x.py:enc"], "--frames does not go with --encoder"),
                           (["--max-chars", "3"], "--frames does not go with --max-chars")):
        assert message in refused(capsys, *base, "--frames", frames, *extra)
    assert "stamps the frames of --frames" in refused(capsys, *base, "--text", tmp_path / "t.txt", "--times", frames)
    assert "comes with an encoder" in refused(capsys, "probe", tiny_checkpoint, "--frames", frames, "--out",
                                              tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_analyze_refuses_text_features_and_frames_that_are_not_the_runs(readme, tmp_path, capsys):
    runs, _ = readme
    run = runs / "clips"
    assert "computed on text" in refused(capsys, "analyze", run, "--features", "column")
    assert "no built-in feature applies" in refused(capsys, "analyze", run)
    feats = f"{ROOT / 'examples' / 'frames_lstm.py'}:features"
    assert 'has no "input": a Run keeps no frames' in refused(capsys, "analyze", run, "--features", feats)
    other = _savez(tmp_path / "o.npz", **example.clips(seed=5))
    assert "is not the Run's" in refused(capsys, "analyze", run, "--features", feats, "--frames", other)
    # the Run's own frames without their time stamps (then the step index): not the Run's either
    assert "has other time stamps than the Run's" in refused(capsys, "analyze", run, "--features", feats, "--frames",
                                                             runs / "clips.npz")
    # the same names, lengths and times, other values: the checksum the Run keeps tells them apart
    clips = np.load(runs / "clips.npz")
    twin = _savez(tmp_path / "twin.npz", **{k: clips[k] + np.float32(0.5) for k in clips.files})
    assert "holds other values than the Run was recorded from" in refused(
        capsys, "analyze", run, "--features", feats, "--frames", twin, "--times", runs / "clips.times.npz")


LABELLED = '''
import torch
from torch import nn

CHARS = "ab"


def encode(text):
    return torch.tensor([CHARS.index(c) for c in text])


encode.decode = lambda ids: "".join(CHARS[int(i)] for i in ids)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.gru, self.head = nn.Embedding(2, 4), nn.GRU(4, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.gru(self.embed(ids))[0])


def call(model, ids, document):
    return model(ids) * (2.0 if document["label"] == "loud" else 1.0)       # a field of the corpus's lines


def build():
    import rnnscope as rs
    return rs.Subject(LM(), encode, call=call)
'''


def test_generate_refuses_a_call_that_needs_a_field_of_the_corpus(tmp_path, capsys):
    (tmp_path / "labelled.py").write_text(LABELLED)
    err = refused(capsys, "generate", "--model", f"{tmp_path / 'labelled.py'}:build", "--prime", "ab", "--length", "3")
    assert "asked its document for 'label'" in err, err


def test_a_directory_of_npy_and_one_npy_read_as_the_npz_does(readme, tmp_path):
    """The same clips as .npy files (one Fortran-ordered, one big-endian float64, one a link inside the
    directory) record the same Run as the README's .npz; one .npy is one document named by its stem."""
    runs, _ = readme
    clips, stamps = np.load(runs / "clips.npz"), np.load(runs / "clips.times.npz")
    folder, times = tmp_path / "clips", tmp_path / "times"
    folder.mkdir()
    times.mkdir()
    for i, k in enumerate(clips.files):
        x = clips[k]
        x = np.asfortranarray(x) if i == 0 else x.astype(">f8") if i == 1 else x
        np.save(folder / (f".{k}.npy" if i == 3 else f"{k}.npy"), x)
        np.save(times / f"{k}.npy", stamps[k])
    (folder / "clip3.npy").symlink_to(folder / ".clip3.npy")         # hidden names are skipped, links inside kept
    assert main(["probe", "--model", MODEL, "--frames", str(folder), "--times", str(times), "--dtype", "float32",
                 "--out", str(tmp_path / "run")]) == 0
    run, want = rs.open_run(tmp_path / "run"), rs.open_run(runs / "clips")
    assert run.documents["name"].tolist() == clips.files and np.array_equal(run.times, want.times)
    assert np.array_equal(run["cell.l0.h"], want["cell.l0.h"]) and np.array_equal(run["cell.l0.c"], want["cell.l0.c"])
    assert main(["probe", "--model", MODEL, "--frames", str(folder / "clip2.npy"), "--out", str(tmp_path / "one")]) == 0
    one = rs.open_run(tmp_path / "one")
    assert one.documents["name"].tolist() == ["clip2"] and np.array_equal(one.times, np.arange(len(clips["clip2"])))


STEPPED = '''
import torch
from torch import nn

import rnnscope as rs


class OneFrame(nn.Module):
    """A whole model that reads one frame [1, features] and its state: a GRU cell and a head."""
    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.GRUCell(3, 5), nn.Linear(5, 1)

    def forward(self, frame, h):
        h = self.cell(frame, h)
        return self.head(h), h


def loop(model, x):
    """The user's own loop: the whole model called once per frame of x [1, T, 3]."""
    h, out = None, []
    for t in range(x.shape[1]):
        y, h = model(x[:, t], h)
        out.append(y)
    return torch.stack(out, 1)


def build():
    torch.manual_seed(3)
    return rs.Subject(OneFrame(), call=loop)
'''


def test_a_whole_model_called_once_per_frame_by_its_own_loop(readme, tmp_path):
    runs, _ = readme
    (tmp_path / "stepped.py").write_text(STEPPED)
    assert main(["probe", "--model", f"{tmp_path / 'stepped.py'}:build", "--frames", str(runs / "clips.npz"),
                 "--dtype", "float32", "--out", str(tmp_path / "run")]) == 0
    run, clips = rs.open_run(tmp_path / "run"), np.load(runs / "clips.npz")
    torch.manual_seed(3)
    cell = nn.GRUCell(3, 5)                          # the spec's weights, drawn again from the same seed
    at = 0
    for k in clips.files:
        h, hs = None, []
        with torch.no_grad():
            for x in torch.from_numpy(clips[k]):
                h = cell(x[None], h)
                hs.append(h[0].numpy())
        assert np.array_equal(run["cell.l0.h"][at:at + len(hs)], np.stack(hs))
        at += len(hs)
    assert at == len(run) and sorted(run.keys()) == ["cell.l0.h", "cell.l0.n", "cell.l0.r", "cell.l0.z"]
