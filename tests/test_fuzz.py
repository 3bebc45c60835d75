"""A Run or checkpoint from someone else is untrusted: mutate valid ones at random (truncate, flip
bytes, change types and shapes in the JSON, swap arrays, symlink out, delete, rename) and run every
command over each. Each must succeed or exit 2 with one ``rnnscope: error:`` line: never a
traceback, never an internal error (exit 3), and never a change to a file outside the Run or the
output path. Seeded, and bounded in count (``RNNSCOPE_FUZZ`` examples each; 40 by default)."""
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import char_model
from rnnscope.cli import main
from rnnscope.errors import RnnscopeError
from rnnscope.probe import record
from rnnscope.zoo import save

PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")          # tqdm's bars on stderr are not error lines
EXAMPLES = int(os.environ.get("RNNSCOPE_FUZZ", "40"))
TEXT = 'int f(void) {\n\t/* a "b" */\n\tif (x) { puts("hi"); }\n\treturn 0;\n}\n' * 5
WEIRD = [None, True, -1, 0, 2 ** 63, 1e308, float("nan"), "", "../../x", "$$x$$", [], {}, [1, "a"], {"a": 1}]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_vocab_module):
    base = tmp_path_factory.mktemp("fuzz")
    ck = char_model("lstm", tiny_vocab_module, hidden=8)
    record(ck, TEXT, base / "run", grad=True, dtype="float32", progress=False)
    assert main(["analyze", str(base / "run"), "--no-decay", "--shifts", "2", "--features",
                 "in_comment,column"]) == 0
    save(ck.model, ck.vocab, {"name": "tiny"}, base / "ck")
    (base / "text.txt").write_text(TEXT)
    return base


@pytest.fixture(scope="module")
def tiny_vocab_module():
    from rnnscope.zoo import Vocab
    return Vocab("\t\n \"#(),0;?abcdefghijklmnopqrstuvwxyz{}/*")


def snapshot(root: Path, skip: Path) -> dict:
    """Every file under ``root`` outside ``skip`` -> (size, mtime, first bytes)."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        if Path(dirpath).resolve().is_relative_to(skip.resolve()):
            continue
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                continue
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, p.read_bytes()[:64])
    return out


def mutate_json(path: Path, rng: random.Random) -> str:
    data = json.loads(path.read_text())
    trail, node = [], data
    while isinstance(node, dict) and node and rng.random() < 0.7:
        k = rng.choice(list(node))
        trail.append(k)
        if not isinstance(node[k], dict) or not node[k]:
            break
        node = node[k]
    parent = data
    for k in trail[:-1]:
        parent = parent[k]
    if not trail:
        return "json: left whole"
    action = rng.choice(["weird", "delete", "rename"])
    if action == "weird":
        parent[trail[-1]] = rng.choice(WEIRD)
    elif action == "delete":
        del parent[trail[-1]]
    else:
        parent[rng.choice(["../../escape.l0.h", "rnn.l0.h/../../x", "$$\\href{javascript:1}{x}$$", "l0.c"])] = \
            parent.pop(trail[-1])
    path.write_text(json.dumps(data, allow_nan=True))
    return f"json {action} {'/'.join(map(str, trail))}"


def mutate(root: Path, rng: random.Random, outside: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = rng.choice(files)
    action = rng.choice(["truncate", "flip", "json", "array", "symlink", "delete", "empty", "dir"])
    if target.suffix == ".json" and rng.random() < 0.6:
        action = "json"
    if action == "json" and target.suffix != ".json":
        action = "flip"
    if action == "array" and target.suffix != ".npy":
        action = "truncate"
    data = target.read_bytes()
    if action == "truncate":
        target.write_bytes(data[: rng.randrange(0, max(1, len(data)))])
    elif action == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(b))
    elif action == "json":
        return f"{target.relative_to(root)}: {mutate_json(target, rng)}"
    elif action == "array":
        arr = rng.choice([np.zeros(5, np.int8), np.zeros((3, 4), np.complex64), np.arange(7.0),
                          np.zeros((2, 2, 2), np.float32), np.array([{"a": 1}], dtype=object),
                          np.zeros((10 ** 6, 0), np.float16)])
        target.unlink()
        with open(target, "wb") as f:
            np.save(f, arr, allow_pickle=True)      # an object array is a pickle: it must never be loaded
    elif action == "symlink":
        target.unlink()
        target.symlink_to(outside / "secret.npy" if target.suffix == ".npy" else outside / "secret.txt")
    elif action == "delete":
        target.unlink()
    elif action == "empty":
        target.write_bytes(b"")
    else:                                   # the file's folder replaced by a link to a folder outside
        folder = target.parent
        if folder == root:
            target.unlink()
            target.mkdir()
        else:
            shutil.rmtree(folder)
            folder.symlink_to(outside, target_is_directory=True)
    return f"{target.relative_to(root)}: {action}"


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:           # argparse
        code = exc.code
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return code, [ln for ln in lines if ln.strip() and not PROGRESS.match(ln)]


def check(code, err, what):
    assert code in (0, 2), f"{what}: exit {code}: {err}"
    if code == 2:
        assert len(err) == 1 and err[0].startswith("rnnscope: error:") and " — " in err[0], f"{what}: {err}"
    assert not any("Traceback" in line for line in err), f"{what}: {err}"


def outside_folder(base: Path) -> Path:
    outside = base / "outside"
    outside.mkdir()
    np.save(outside / "secret.npy", np.arange(12.0).reshape(3, 4))
    (outside / "secret.txt").write_text("not yours")
    return outside


@pytest.mark.parametrize("seed", range(EXAMPLES))
def test_a_mutated_run_is_served_or_refused_in_one_line(seed, pristine, tmp_path, capsys):
    rng = random.Random(seed)
    run = tmp_path / "run"
    shutil.copytree(pristine / "run", run)
    outside = outside_folder(tmp_path)
    what = " + ".join(mutate(run, rng, outside) for _ in range(rng.choice([1, 1, 2])))
    before = snapshot(tmp_path, run)
    for argv in (["analyze", str(run), "--no-decay", "--shifts", "2", "--features", "in_comment"],
                 ["export", str(run), "--unit", "rnn.l0.c:1", "--out", str(tmp_path / "u.html")],
                 ["export", str(run), "--feature", "in_comment", "--top", "3", "--out", str(tmp_path / "f.html"),
                  "--overwrite"]):
        code, err = run_cli(argv, capsys)
        check(code, err, f"{what} / {argv[0]}")
    after = snapshot(tmp_path, run)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {str(tmp_path / "u.html"), str(tmp_path / "f.html")}, (what, changed)


@pytest.mark.parametrize("seed", range(EXAMPLES // 2))
def test_a_mutated_checkpoint_is_probed_or_refused_in_one_line(seed, pristine, tmp_path, capsys):
    rng = random.Random(1000 + seed)
    ck = tmp_path / "ck"
    shutil.copytree(pristine / "ck", ck)
    outside = outside_folder(tmp_path)
    what = mutate(ck, rng, outside)
    out = tmp_path / "out"
    before = snapshot(tmp_path, out)
    code, err = run_cli(["probe", str(ck), "--text", str(pristine / "text.txt"), "--out", str(out)], capsys)
    check(code, err, what)
    if code == 2:
        assert not out.exists(), what
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], what   # no partial left behind
    after = snapshot(tmp_path, out)
    assert before == after, what


# -- tables and watch-log blocks, mutated as bytes and as Arrow data, read by their own readers ----------

def _flip_or_cut(data: bytes, rng: random.Random) -> bytes:
    """Bit flips (half of them in the last 300 bytes, where Parquet's and Arrow's footers are) or a cut."""
    if rng.random() < 0.3:
        return data[: rng.randrange(0, len(data))]
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        lo = max(0, len(b) - 300) if rng.random() < 0.5 else 0
        b[rng.randrange(lo, len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _other_type(col: pa.ChunkedArray, rng: random.Random) -> pa.Array:
    n = len(col)
    return rng.choice([pa.array(["x"] * n), pa.array([2 ** 62] * n), pa.array([float("nan")] * n),
                       pa.array([[1.0]] * n), pa.array([b"\x00"] * n), pa.nulls(n),
                       pa.array([{"a": 1}] * n), pa.array(["a"] * n).dictionary_encode(),
                       pa.array(np.zeros(n, "datetime64[ns]")), pa.array([True] * n)])


def mutate_arrow(table: pa.Table, rng: random.Random) -> tuple[pa.Table, str]:
    """A column dropped, renamed or given another type: a file that reads, with the wrong schema."""
    i = rng.randrange(table.num_columns)
    name, action = table.column_names[i], rng.choice(["drop", "rename", "type", "type"])
    if action == "drop":
        return table.remove_column(i), f"drop {name}"
    if action == "rename":
        return table.rename_columns([c if j != i else rng.choice(["", "../x", "key ", "Key"])
                                     for j, c in enumerate(table.column_names)]), f"rename {name}"
    new = _other_type(table.column(i), rng)
    return table.set_column(i, name, new), f"{name} as {new.type}"


def _read_all_tables(run: Path) -> None:
    from rnnscope.store.run import open_run
    from rnnscope.store.tables import SCHEMAS, read_table
    r = open_run(run)
    assert len(r.documents) >= 1
    for name in SCHEMAS:
        frame = read_table(run, name)
        assert frame is None or isinstance(frame, pd.DataFrame)


@pytest.mark.parametrize("seed", range(EXAMPLES))
def test_a_mutated_parquet_table_reads_or_is_refused_in_one_line(seed, pristine, tmp_path):
    """analysis/*.parquet and documents.parquet: bytes flipped or cut, or a real file of the wrong schema."""
    rng = random.Random(3000 + seed)
    run = tmp_path / "run"
    shutil.copytree(pristine / "run", run)
    target = rng.choice(sorted((run / "analysis").glob("*.parquet")) + [run / "documents.parquet"] * 3)
    if rng.random() < 0.5:
        target.write_bytes(_flip_or_cut(target.read_bytes(), rng))
        what = f"{target.name}: bytes"
    else:
        table, what = mutate_arrow(pq.read_table(target), rng)
        pq.write_table(table, target)
        what = f"{target.name}: {what}"
    try:
        _read_all_tables(run)
    except RnnscopeError as err:
        assert "\n" not in str(err) and " — " in str(err), (what, str(err))


@pytest.fixture(scope="module")
def watch_log(tmp_path_factory):
    """A real watch log: a two-layer LSTM trained for 12 steps, watched every 2, a block every 2 watched."""
    import torch
    from torch import nn

    import rnnscope as rs

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(7, 4), nn.LSTM(4, 6, 2, batch_first=True), nn.Linear(6, 7)

        def forward(self, x):
            return self.head(self.rnn(self.emb(x))[0])

    torch.manual_seed(0)
    model, log = Tagger(), tmp_path_factory.mktemp("watch") / "log"
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with rs.Watch(model, out=log, every=2, flush_every=2) as watch:
        for step in range(12):
            x = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(step))
            with watch.step(step):
                loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
                loss.backward()
                watch.loss(loss)
            opt.step()
            opt.zero_grad()
    assert len(list((log / "blocks").glob("*.arrow"))) == 3
    return log


# 397 flips a string offset past its buffer: read unvalidated, pandas raised ArrowException (or crashed)
@pytest.mark.parametrize("seed", sorted({397, *range(EXAMPLES)}))
def test_a_mutated_watch_log_block_reads_or_is_refused_in_one_line(seed, watch_log, tmp_path):
    import warnings

    from rnnscope.store.watchlog import TABLES, open_watch_log
    rng = random.Random(4000 + seed)
    log = tmp_path / "log"
    shutil.copytree(watch_log, log)
    target = rng.choice(sorted((log / "blocks").glob("*.arrow")))
    if rng.random() < 0.6:
        target.write_bytes(_flip_or_cut(target.read_bytes(), rng))
        what = f"{target.name}: bytes"
    else:
        table = pa.ipc.open_file(pa.py_buffer(target.read_bytes())).read_all()
        table, what = mutate_arrow(table, rng)
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = open_watch_log(log)
        for t in TABLES:
            assert isinstance(getattr(w, t), pd.DataFrame), what
    except RnnscopeError as err:
        assert "\n" not in str(err) and " — " in str(err), (what, str(err))
