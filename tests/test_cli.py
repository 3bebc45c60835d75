"""The front door, run as a user runs it: a subprocess, exit codes, one-line errors."""
import json
import subprocess
import sys


from rnnscope import probe
from rnnscope import zoo

FLOORS = {"lstm-linux": 1.40, "lstm-shakespeare": 1.70}


def rnnscope(*args, check=True):
    # a command that should have been refused but serves instead fails the test rather than hanging the suite
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc, pattern):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnscope: error:"), proc.stderr
    assert pattern in lines[0], lines[0]


def test_version_and_help_on_every_subcommand():
    assert rnnscope("--version").stdout.startswith("rnnscope ")
    for cmd in ([], ["zoo"], ["zoo", "list"], ["zoo", "corpus"], ["zoo", "train"], ["probe"]):
        out = rnnscope(*cmd, "--help").stdout
        assert "usage: rnnscope" in out


def test_zoo_list_json_has_the_six_small_checkpoints_under_the_floors():
    rows = json.loads(rnnscope("zoo", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert {f"{a}-{c}" for a in ("rnn", "lstm", "gru") for c in ("linux", "shakespeare")} <= set(by_name)
    for name, floor in FLOORS.items():
        assert by_name[name]["test_loss"] <= floor
    for r in rows:
        assert set(r) >= {"name", "arch", "corpus", "layers", "hidden", "params", "val_loss", "test_loss"}
    params = [by_name[f"{a}-linux"]["params"] for a in ("rnn", "lstm", "gru")]
    assert max(params) / min(params) < 1.02            # equal parameter budgets, as in Karpathy et al.


def test_probe_a_zoo_checkpoint_with_gradients(tmp_path):
    sample = zoo.SAMPLES / "linux.c"
    text = tmp_path / "t.c"
    text.write_text(sample.read_text()[:3000])
    out = rnnscope("probe", "zoo:lstm-linux", "--text", text, "--out", tmp_path / "run", "--grad")
    assert "wrote" in out.stdout and "MB" in out.stdout
    run = probe.open_run(tmp_path / "run")
    assert len(run) == 3000 and run["rnn.l1.grad_c"].shape == (3000, 256) and run["rnn.l0.f"].dtype == "float16"
    assert run.manifest["loss"]["mean_nats"] < 2.0      # a trained model on held-out C


def test_probe_bad_inputs_exit_non_zero_with_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("int x;\n")
    one_line_error(rnnscope("probe", "zoo:nope", "--text", text, "--out", tmp_path / "a", check=False),
                   "unknown zoo checkpoint 'nope'")
    one_line_error(rnnscope("probe", "zoo:lstm-linux", "--text", tmp_path / "none.txt", "--out", tmp_path / "a",
                            check=False), "does not exist")
    (tmp_path / "u.txt").write_text("caf\u00e9 \u2603\n")
    one_line_error(rnnscope("probe", "zoo:lstm-linux", "--text", tmp_path / "u.txt", "--out", tmp_path / "a",
                            check=False), "--unk")
    (tmp_path / "e.txt").write_text("")
    one_line_error(rnnscope("probe", "zoo:lstm-linux", "--text", tmp_path / "e.txt", "--out", tmp_path / "a",
                            check=False), "text is empty")
    (tmp_path / "exists").mkdir()
    one_line_error(rnnscope("probe", "zoo:lstm-linux", "--text", text, "--out", tmp_path / "exists", check=False),
                   "--overwrite")
    bad = tmp_path / "ck"
    bad.mkdir()
    for f in ("card.json", "weights.safetensors"):
        (bad / f).write_bytes((zoo.shipped()["lstm-linux"] / f).read_bytes())
    (bad / "weights.safetensors").write_bytes((bad / "weights.safetensors").read_bytes()[:-1000])
    one_line_error(rnnscope("probe", bad, "--text", text, "--out", tmp_path / "a", check=False), "truncated")
    assert not (tmp_path / "a").exists()


def test_train_refuses_an_unbuilt_corpus_name_cleanly():
    proc = rnnscope("zoo", "train", "--corpus", "klingon", "--out", "x", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_ctrl_c_during_probe_leaves_no_run(tmp_path):
    import signal
    import time
    text = tmp_path / "big.c"
    text.write_text((zoo.SAMPLES / "linux.c").read_text() * 12)
    out = tmp_path / "run"
    # a runner that starts jobs in the background hands them SIGINT ignored: give the child the
    # default back, as a terminal would, so Python turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "rnnscope.cli", "probe", "zoo:lstm-linux", "--text", str(text),
                             "--out", str(out), "--grad"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".run.partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("rnnscope: error: interrupted: no run was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.c"]


def test_unk_maps_characters_outside_the_vocabulary(tmp_path):
    (tmp_path / "u.txt").write_text("caf\u00e9;\n")
    rnnscope("probe", "zoo:lstm-linux", "--text", tmp_path / "u.txt", "--out", tmp_path / "r", "--unk", "?")
    run = probe.open_run(tmp_path / "r")
    assert run.text == "caf\u00e9;\n" and run.manifest["unk"] == "?"
