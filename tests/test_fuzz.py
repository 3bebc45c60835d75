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
import pytest

from conftest import char_model
from rnnscope.cli import main
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
