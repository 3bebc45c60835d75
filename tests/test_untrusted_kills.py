"""Issue 24, kills and a full disk: what a command says is what happened, and the old Run survives."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnnscope.probe import open_run

TEXT = "if (a) {\n\tb(c, d);\n}\n" * 20
SLOW = '''import pathlib, time, torch
def slow(output, ids):
    pathlib.Path({ready!r}).write_text("x")
    time.sleep(60)
    return torch.zeros(output.shape[1])
'''


def _probe(ck, tmp_path, *more, loss=None):
    (tmp_path / "t.c").write_text(TEXT)
    args = [sys.executable, "-m", "rnnscope.cli", "probe", str(ck), "--text", str(tmp_path / "t.c"), "--out",
            str(tmp_path / "run"), *more]
    if loss:
        args += ["--loss", loss]
    return args


def test_sigterm_during_probe_cleans_up_like_ctrl_c_and_keeps_the_old_run(tmp_path, tiny_checkpoint):
    subprocess.run(_probe(tiny_checkpoint, tmp_path), check=True, capture_output=True, timeout=300)
    before = (tmp_path / "run" / "manifest.json").read_bytes()
    (tmp_path / "slow.py").write_text(SLOW.format(ready=str(tmp_path / "ready")))
    proc = subprocess.Popen(_probe(tiny_checkpoint, tmp_path, "--overwrite", loss=f"{tmp_path / 'slow.py'}:slow"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    assert any(p.name.startswith(".run.partial-") for p in tmp_path.iterdir())      # mid-write
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("rnnscope:")]     # (and the progress bar)
    assert proc.returncode == 2 and len(errors) == 1 and "interrupted" in errors[0], err
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before             # the old Run, untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no partial left behind


REPLACE = '''import sys
from rnnscope import probe, zoo
ck = zoo.load(sys.argv[1])
probe.record(ck, sys.argv[2], sys.argv[3], overwrite=True, progress=False)
'''


def test_an_interrupt_while_the_old_run_is_deleted_says_the_new_run_is_written(tmp_path, tiny_checkpoint):
    """The old Run holds many files, so deleting it takes a while; the interrupt comes once the new Run
    is in place (its manifest is the new one), while the old is being removed."""
    from rnnscope import probe, zoo
    old = probe.record(zoo.load(tiny_checkpoint), TEXT, tmp_path / "run", progress=False).path
    clutter = old / "analysis"          # files of its own (tables, by their names): --overwrite deletes them
    clutter.mkdir()
    for i in range(40_000):
        (clutter / f"t{i}.json").touch()
    (tmp_path / "replace.py").write_text(REPLACE)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "replace.py"), str(tiny_checkpoint), TEXT[:50],
                             str(old)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while True:
        try:
            if json.loads((old / "manifest.json").read_text())["steps"] == 50:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None and time.time() < deadline, "the new Run never appeared while the old was removed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "no run was written" not in err
    assert "interrupted after the new Run was written" in err, err
    assert len(open_run(old)) == 50


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


FILL = '''import torch
def fill(output, ids):
    with open({path!r}, "wb") as f:        # another process fills the disk while the probe writes
        try:
            while True:
                f.write(b"x" * 65536)
        except OSError:
            pass
    return torch.zeros(output.shape[1])
'''


def test_a_disk_that_fills_while_probe_writes_says_so(small_disk, tmp_path, tiny_checkpoint):
    (tmp_path / "fill.py").write_text(FILL.format(path=str(small_disk / "filler")))
    (tmp_path / "t.c").write_text(TEXT * 20)
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", "probe", str(tiny_checkpoint), "--text",
                           str(tmp_path / "t.c"), "--out", str(small_disk / "run"), "--loss",
                           f"{tmp_path / 'fill.py'}:fill"], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rnnscope:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    err = errors[0]
    assert "no space left on" in err and "MB needed" not in err and "the Run needs" in err
    assert f"nothing was written to {small_disk / 'run'}" in err
    assert sorted(p.name for p in Path(small_disk).iterdir()) == ["filler"]


# -- analyze killed or interrupted while it writes its tables ------------------------------------------

ANY_TEMPORARY = re.compile(r"^\.([a-z][a-z0-9_]*\.(?:parquet|json))\.")


@pytest.fixture
def analysed(tmp_path, tiny_checkpoint):
    from rnnscope import probe, zoo
    from rnnscope.cli import main
    run = probe.record(zoo.load(tiny_checkpoint), TEXT * 4, tmp_path / "run", grad=True, progress=False).path
    assert main(["analyze", str(run), "--no-decay", "--shifts", "2"]) == 0
    return run


def _tables(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in (run / "analysis").iterdir() if not p.name.startswith(".")}


def _analyze_until_second_table(run: Path, sig) -> tuple[subprocess.Popen, set]:
    """``rnnscope analyze`` again (another null: other tables), sent ``sig`` once a second table is being
    written (or one is replaced)."""
    before = {p.name: p.stat().st_ino for p in (run / "analysis").iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "rnnscope.cli", "analyze", str(run), "--no-decay", "--shifts", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + 240, set()
    while time.time() < deadline and proc.poll() is None:
        names = {p.name: p for p in (run / "analysis").iterdir()}
        seen |= {m[1] for n in names if (m := ANY_TEMPORARY.match(n))}
        replaced = any(n in before and p.exists() and p.stat().st_ino != before[n] for n, p in names.items()
                       if not n.startswith("."))
        if len(seen) >= 2 or replaced:
            proc.send_signal(sig)
            break
        time.sleep(0.0005)
    proc.communicate(timeout=120)
    return proc, seen


def _inodes(run: Path) -> dict:
    return {p.name: p.stat().st_ino for p in (run / "analysis").iterdir() if not p.name.startswith(".")}


def test_ctrl_c_while_analyze_writes_its_tables_leaves_the_old_ones(analysed):
    old, inodes = _tables(analysed), _inodes(analysed)
    proc, seen = _analyze_until_second_table(analysed, signal.SIGINT)
    assert len(seen) >= 1, "analyze finished before a table was written"
    assert proc.returncode in (2, 130)
    replaced = {n for n, i in _inodes(analysed).items() if inodes.get(n) != i}
    # all or none: the interrupt lands while tables are staged (the old ones stay), or, held off, just
    # after the renames (every table new); never some of each
    assert replaced in (set(), set(inodes)), replaced
    if not replaced:
        assert _tables(analysed) == old
    assert not [p.name for p in (analysed / "analysis").iterdir() if p.name.startswith(".")]


def test_temporaries_of_a_killed_analyze_are_never_tables_and_the_next_write_removes_them(analysed):
    from rnnscope.cli import main
    from rnnscope.store.tables import SCHEMAS, read_table
    old = _tables(analysed)
    proc, seen = _analyze_until_second_table(analysed, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and seen
    left = [p.name for p in (analysed / "analysis").iterdir() if ANY_TEMPORARY.match(p.name)]
    assert left and _tables(analysed) == old                           # the kill left temporaries, old tables
    for name in SCHEMAS:                                               # which read as the old tables
        assert read_table(analysed, name) is None or name + ".parquet" in old
    assert main(["analyze", str(analysed), "--no-decay", "--shifts", "2"]) == 0
    assert not [p.name for p in (analysed / "analysis").iterdir() if p.name.startswith(".")]


# -- --overwrite replaces a Run, and only what rnnscope wrote in it ------------------------------------

@pytest.mark.parametrize("extra", ["states/README", "analysis/my_plot.png"])
def test_overwrite_refuses_a_run_holding_files_rnnscope_did_not_write(tmp_path, tiny_checkpoint, extra, capsys):
    """Inside the folders rnnscope reads back and checks, a file of someone else's is refused, not deleted."""
    from rnnscope import probe, zoo
    from rnnscope.cli import main
    ck = zoo.load(tiny_checkpoint)
    run = probe.record(ck, TEXT, tmp_path / "run", progress=False).path
    assert main(["analyze", str(run), "--no-decay", "--shifts", "2"]) == 0        # its own tables are its own
    (run / extra).write_text("the user's own")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    (tmp_path / "t.c").write_text(TEXT[:60])
    assert main(["probe", str(tiny_checkpoint), "--text", str(tmp_path / "t.c"), "--out", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rnnscope: error:") and f"({extra})" in err and "would delete" in err, err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before and (run / extra).exists()
    (run / extra).unlink()                                  # once moved out, the Run is replaced
    assert main(["probe", str(tiny_checkpoint), "--text", str(tmp_path / "t.c"), "--out", str(run), "--overwrite"]) == 0
    assert len(open_run(run)) == 60


def test_overwrite_carries_the_users_own_files_at_the_top_of_the_run_into_the_new_one(tmp_path, tiny_checkpoint):
    """An exported figure, notes, a folder of one's own, a link: kept, byte for byte, in the Run that
    replaces the old one; the old Run's tables go with it."""
    from rnnscope import probe, zoo
    from rnnscope.cli import main
    ck = zoo.load(tiny_checkpoint)
    run = probe.record(ck, TEXT, tmp_path / "run", progress=False).path
    assert main(["analyze", str(run), "--no-decay", "--shifts", "2"]) == 0
    assert main(["export", str(run), "--unit", "rnn.l0.h:0", "--out", str(run / "unit.html")]) == 0
    (run / "notes.txt").write_text("the user's own")
    (run / "mine").mkdir()
    (run / "mine" / "data.csv").write_bytes(b"a,b\n1,2\n")
    (run / "link").symlink_to(tmp_path / "elsewhere")
    page = (run / "unit.html").read_bytes()
    (tmp_path / "t.c").write_text(TEXT[:60])
    assert main(["probe", str(tiny_checkpoint), "--text", str(tmp_path / "t.c"), "--out", str(run), "--overwrite"]) == 0
    assert len(open_run(run)) == 60 and not (run / "analysis").exists()
    assert (run / "unit.html").read_bytes() == page and (run / "notes.txt").read_text() == "the user's own"
    assert (run / "mine" / "data.csv").read_bytes() == b"a,b\n1,2\n"
    assert (run / "link").is_symlink() and os.readlink(run / "link") == str(tmp_path / "elsewhere")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]     # nothing left beside it


# -- SIGKILL at the worst instant of a swap: the old Run or the new one, never neither -----------------

KILLED_SWAP = '''import os, shutil, signal, sys
from rnnscope import probe, zoo
from rnnscope.store import writer
where = sys.argv[4]
if where == "aside":                    # the fallback (no RENAME_EXCHANGE): killed with the old Run moved aside
    writer._exchange = lambda a, b: False
    rename = os.rename
    def killing_rename(a, b):
        rename(a, b)
        if str(b).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    writer.os.rename = killing_rename
else:                                   # exchanged, killed while the old Run is deleted
    writer.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
probe.record(zoo.load(sys.argv[1]), sys.argv[2], sys.argv[3], overwrite=True, progress=False)
'''


@pytest.mark.parametrize("where", ["aside", "deleting"])
def test_a_swap_killed_at_its_worst_instant_leaves_a_run_the_next_probe_keeps(tmp_path, tiny_checkpoint, where,
                                                                              capsys):
    from rnnscope import probe, zoo
    from rnnscope.errors import RnnscopeError
    out = probe.record(zoo.load(tiny_checkpoint), TEXT, tmp_path / "run", progress=False).path
    (tmp_path / "kill.py").write_text(KILLED_SWAP)
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tiny_checkpoint), TEXT[:50], str(out),
                           where], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if where == "deleting":
        assert len(open_run(out)) == 50                     # the new Run, whole
    else:                                                   # no Run under its name: said in one line, with where
        with pytest.raises(RnnscopeError) as e:
            open_run(out)
        msg = str(e.value)
        assert "\n" not in msg and "killed while replacing it" in msg and ".run.partial-" in msg, msg
    from rnnscope.cli import main                           # the next probe puts back or clears, then writes
    (tmp_path / "t.c").write_text(TEXT[:70])
    assert main(["probe", str(tiny_checkpoint), "--text", str(tmp_path / "t.c"), "--out", str(out), "--overwrite"]) == 0
    assert len(open_run(out)) == 70
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]
