"""The trainer on a tiny corpus built by the real corpus writer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rnnscope import zoo
from rnnscope.zoo import RnnscopeError
from rnnscope.zoo.corpora import _write_corpus
from rnnscope.store.watchlog import open_watch_log
from rnnscope.zoo.train import TrainConfig, learning_rate, train

SAMPLE = (zoo.SAMPLES / "shakespeare.txt").read_text()
TINY = dict(corpus="shakespeare", hidden=24, embed=8, batch=4, seq_len=16, val_every=20, checkpoint_every=10)


@pytest.fixture
def tiny_corpus():
    files = {f"play{i:02d}.txt": SAMPLE[i * 1000:(i + 1) * 1000] for i in range(12)}
    return _write_corpus("shakespeare", files, "test sample")


def _weights(path):
    return zoo.load(path).model.state_dict()


def test_learning_rate_schedule():
    c = TrainConfig(steps=1000, warmup=100, lr=1e-2, min_lr=1e-4)
    assert learning_rate(c, 0) == pytest.approx(1e-4)
    assert learning_rate(c, 99) == pytest.approx(1e-2)
    assert learning_rate(c, 999) == pytest.approx(1e-4, rel=1e-3)
    assert learning_rate(c, 550) < learning_rate(c, 300)


def test_training_learns_and_writes_a_complete_card(tiny_corpus, tmp_path):
    torch.set_num_threads(1)
    out = train(TrainConfig(arch="gru", steps=60, watch_every=20, **TINY), tmp_path / "m", data=tiny_corpus)
    card = json.loads((out / "card.json").read_text())
    log = open_watch_log(out / "watch")                                   # the run's gradient history
    assert list(log.steps.step) == [0, 20, 40] and log.steps.loss_finite.all()
    assert set(log.timesteps.key) == {"rnn.l0.grad_h", "rnn.l1.grad_h"} and log.timesteps.t.max() == 15
    assert len(card["training"]["grad_norm_preclip"]) == 60 and card["training"]["watch_every"] == 20
    curve = card["training"]["curve"]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"] - 0.3        # it learned
    assert len(card["training"]["grad_norm_preclip"]) == 60
    assert card["corpus"]["train_sha256"] == tiny_corpus.manifest["splits"]["train"]["sha256"]
    assert card["test_bpc"] == pytest.approx(card["test_loss"] / 0.693147, rel=1e-3)
    assert card["training"]["chars_seen"] == 60 * 4 * 16


def test_resume_after_sigkill_is_bit_exact(tiny_corpus, tmp_path):
    """A real process, killed with SIGKILL mid-run, then resumed by the same command."""
    args = ["--corpus", "shakespeare", "--arch", "lstm", "--hidden", "24", "--embed", "8", "--batch", "4",
            "--seq-len", "16", "--steps", "300", "--checkpoint-every", "10", "--val-every", "100",
            "--dropout", "0.2", "--layers", "2", "--threads", "1"]
    cmd = [sys.executable, "-m", "rnnscope.cli", "zoo", "train", *args]
    env = dict(os.environ)
    subprocess.run(cmd + ["--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "train_state" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text())["step"] >= 40):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(progress.read_text())["step"]
    assert 40 <= step < 300 and not (tmp_path / "killed" / "card.json").exists()
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((tmp_path / "straight" / "card.json").read_text())["training"]["grad_norm_preclip"]
    cb = json.loads((tmp_path / "killed" / "card.json").read_text())["training"]["grad_norm_preclip"]
    assert ca == cb


def test_ctrl_c_saves_state_and_says_how_to_resume(tiny_corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = torch.nn.utils.clip_grad_norm_

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt)
    with pytest.raises(RnnscopeError, match="interrupted at step 14 of 40.*run the same command again"):
        train(TrainConfig(steps=40, **TINY), tmp_path / "m", data=tiny_corpus)
    assert not (tmp_path / "m" / "card.json").exists()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", original)
    train(TrainConfig(steps=40, **TINY), tmp_path / "m", data=tiny_corpus)
    assert zoo.load(tmp_path / "m").card["training"]["steps_done"] == 40


def test_resuming_with_other_options_is_refused(tiny_corpus, tmp_path):
    train(TrainConfig(steps=12, **TINY), tmp_path / "m", data=tiny_corpus)
    with pytest.raises(RnnscopeError, match="different configuration.*--fresh"):
        train(TrainConfig(steps=12, **{**TINY, "hidden": 32}), tmp_path / "m", data=tiny_corpus)


def test_damaged_training_state_is_one_clear_error(tiny_corpus, tmp_path):
    train(TrainConfig(steps=12, **TINY), tmp_path / "m", data=tiny_corpus)
    state = next((tmp_path / "m" / "train_state").glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(RnnscopeError, match="training state .* (unreadable|checksum).*--fresh"):
        train(TrainConfig(steps=12, **TINY), tmp_path / "m", data=tiny_corpus)
