"""Watch on real training loops: exact per-timestep gradients, the last step's decay against an unrolled
float64 reference, clipping and non-finite flags, and a log that survives SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnscope as rs
from rnnscope.probe.watch import decay_curve, half_life, step_norms
from rnnscope.store.watchlog import is_watch_log, open_watch_log
from reference import unrolled


class Tagger(nn.Module):
    def __init__(self, family=nn.LSTM, layers=2, hidden=12):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(10, 6), family(6, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def _batch(seed, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (B, T), generator=g), torch.randint(0, 10, (B, T), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _train(model, watch, steps, start=0, max_norm=None, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr)
    for step in range(start, start + steps):
        x, y = _batch(step)
        with watch.step(step):
            loss = _loss(model, x, y)
            loss.backward()
            watch.loss(loss)
        if max_norm is not None:
            watch.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", [nn.LSTM, nn.GRU, nn.RNN])
def test_norms_equal_probe_and_decay_matches_float64_autograd(tmp_path, family):
    torch.manual_seed(0)
    model = Tagger(family)
    x, y = _batch(0)
    with rs.Probe(model, grad=True) as p:
        _loss(model, x, y).backward()
    want = {k: step_norms(p.trace[k]) for k in p.trace if ".grad_" in k}
    model.zero_grad()
    # the reference: the loss at the last step alone, float64, through the unrolled textbook recurrence
    out, _, deltas = unrolled(model.rnn, model.emb(x).detach(), perturb=True)
    last = F.cross_entropy(out[:, -1] @ model.head.weight.double().T + model.head.bias.double(), y[:, -1])
    ref = dict(zip(deltas, torch.autograd.grad(last, list(deltas.values()))))

    with rs.Watch(model, out=tmp_path / "log", every=5) as watch:
        _train(model, watch, 6)
    log = open_watch_log(tmp_path / "log")
    assert list(log.steps.step) == [0, 5]
    assert len(want) == len(log.manifest["keys"]) == (4 if family is nn.LSTM else 2)
    ts = log.timesteps[log.timesteps.step == 0]
    for key, (mean, mx) in want.items():
        rows = ts[ts.key == key].sort_values("t")
        np.testing.assert_array_equal(rows["mean"].to_numpy(), mean)     # exact: the same trace
        np.testing.assert_array_equal(rows["max"].to_numpy(), mx)
        assert list(rows.lag) == list(range(8, -1, -1))
    dec = log.decay[log.decay.step == 0]
    for (layer, rev, kind), g in ref.items():
        key = f"rnn.l{layer}.grad_{kind}"
        got = dec[dec.key == key].sort_values("lag")["norm"].to_numpy()
        np.testing.assert_allclose(got, decay_curve(g), rtol=2e-4, atol=1e-7)
        if kind == "h":
            layer_row = log.layers[(log.layers.step == 0) & (log.layers.key == f"rnn.l{layer}")]
            np.testing.assert_allclose(layer_row.half_life, half_life(decay_curve(g)), rtol=1e-3)
    sat = log.layers[["sat_i", "sat_r", "sat_h"]].notna().all()
    assert list(sat) == [family is nn.LSTM, family is nn.GRU, family is nn.RNN]


def test_half_life_interpolates_and_never_halving_is_nan():
    assert half_life(np.array([1.0, 0.75, 0.25])) == pytest.approx(1.5)
    assert np.isnan(half_life(np.array([1.0, 0.9, 0.6])))


def test_clipping_recorded_and_unwatched_steps_install_nothing(tmp_path):
    torch.manual_seed(1)
    model = Tagger(nn.GRU, layers=1)
    forward = model.rnn.forward
    with rs.Watch(model, out=tmp_path / "log", every=3) as watch:
        watch.before(1)
        assert model.rnn.forward == forward and not model.rnn._forward_hooks      # nothing on an unwatched step
        watch.after()
        _train(model, watch, 6, start=2, max_norm=1e-3)
    steps = open_watch_log(tmp_path / "log").steps
    assert list(steps.step) == [3, 6]
    assert steps.clipped.all() and (steps.grad_norm > 1e-3).all()
    assert list(steps.clips) == [2, 3]          # every step clipped: 2-3, then 4-6 (unwatched steps counted too)
    np.testing.assert_allclose(steps.grad_norm_after, 1e-3, rtol=1e-4)
    assert "forward" not in vars(model.rnn)          # the model left as it was


def test_nonfinite_loss_flagged_and_training_goes_on(tmp_path):
    torch.manual_seed(2)
    model = Tagger(nn.RNN, layers=1)
    with rs.Watch(model, out=tmp_path / "log", every=1) as watch:
        for step in range(3):
            x, y = _batch(step)
            watch.before(step)
            loss = _loss(model, x, y) * (float("nan") if step == 1 else 1.0)
            loss.backward()
            watch.after(loss)
            model.zero_grad()
    steps = open_watch_log(tmp_path / "log").steps
    assert list(steps.step) == [0, 1, 2]
    assert list(steps.loss_finite) == [True, False, True]
    assert list(steps["flags"]) == ["", "nonfinite_loss,nonfinite_grad", ""]


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(rs.RnnscopeError, match="no nn.RNN, nn.LSTM or nn.GRU"):
        rs.Watch(nn.Linear(3, 3), out=tmp_path / "a")
    model = Tagger(nn.RNN, layers=1)
    with rs.Watch(model, out=tmp_path / "log", every=1):
        with pytest.raises(rs.RnnscopeError, match="in use by another Watch") as err:
            rs.Watch(model, out=tmp_path / "log")
        assert "\n" not in str(err.value)
    with rs.Watch(model, out=tmp_path / "log", every=1) as watch:      # released on close
        with pytest.raises(rs.RnnscopeError, match="whole number"):
            watch.before(-1)
    with pytest.raises(rs.RnnscopeError, match="other recurrent modules"):
        rs.Watch(Tagger(nn.LSTM, layers=1), out=tmp_path / "log")
    (tmp_path / "x").mkdir()
    with pytest.raises(rs.RnnscopeError, match="watch log"):
        open_watch_log(tmp_path / "x")
    assert not is_watch_log(tmp_path / "x") and is_watch_log(tmp_path / "log")


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import rnnscope as rs
    from test_watch import Tagger, _train
    torch.manual_seed(0)
    model = Tagger(torch.nn.LSTM)
    watch = rs.Watch(model, out={log!r}, every=1, flush_every=2)
    _train(model, watch, 10 ** 6)
""")


def test_sigkill_mid_training_loses_at_most_a_block_and_resumes(tmp_path):
    log = tmp_path / "log"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=os.path.dirname(__file__), log=str(log))])
    try:
        deadline = time.time() + 120
        while len(list((log / "blocks").glob("*.arrow"))) < 3:
            assert child.poll() is None and time.time() < deadline, "the training loop did not write blocks"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    reader = open_watch_log(log)
    n = len(reader.steps)
    assert n >= 6 and n % 2 == 0 and list(reader.steps.step) == list(range(n))       # nothing earlier lost
    assert set(reader.decay.step) == set(range(n))
    # a last block that lost its tail (a disk that did not keep it): dropped with a warning
    blocks = sorted((log / "blocks").glob("*.arrow"))
    data = blocks[-1].read_bytes()
    torn = log / "blocks" / f"{n:012d}-{n + 1:012d}.arrow"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="torn"):
        assert reader.refresh() == 0
    assert len(reader.steps) == n
    # a new Watch continues the log: the torn block moved aside, the step going back flagged, nothing overwritten
    model = Tagger(nn.LSTM)
    with pytest.warns(UserWarning, match="moved aside"):
        watch = rs.Watch(model, out=log, every=1)
    with watch:
        _train(model, watch, 2, start=n)
        _train(model, watch, 1, start=0)
    assert reader.refresh() == 3
    steps = reader.steps
    assert list(steps.step) == [*range(n + 2), 0] and list(steps["flags"][-3:]) == ["", "", "step_backwards"]
    assert (log / "blocks" / f"{torn.name}.torn").exists()
    assert len(list((log / "blocks").glob("*.arrow"))) == len(blocks) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_watch_log(log).steps) == n + 3
