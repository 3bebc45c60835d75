"""Gradient flow: decay curves equal autograd through the float64 unrolled reference; per-step norms
equal the recorded gradients; the half-life fit recovers a known decay."""
import numpy as np
import pandas as pd
import pytest
import torch

from rnnscope.analysis.gradflow import gradient_decay, gradient_norms, half_lives
from conftest import char_model
from rnnscope.probe import record
from reference import unrolled
from rnnscope.errors import RnnscopeError


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_decay_curve_equals_autograd_on_the_unrolled_reference(arch, tiny_vocab):
    ck = char_model(arch, tiny_vocab, seed=3)
    m = ck.model
    warmup, max_lag = 4, 12
    W = warmup + max_lag + 1
    ids = tiny_vocab.encode(("if (a, b) { c; }\n" * 3)[: W + 1])     # one possible position: t = W - 1
    curve = gradient_decay(m, ids, positions=8, max_lag=max_lag, warmup=warmup, progress=False)
    x = m.embed(ids[:, :W]).detach()
    out, _, deltas = unrolled(m.rnn, x, perturb=True)
    logits = torch.nn.functional.linear(out[:, -1], m.head.weight.double(), m.head.bias.double())
    loss = torch.nn.functional.cross_entropy(logits, ids[:, W])
    keys = sorted(deltas)
    grads = torch.autograd.grad(loss, [deltas[k] for k in keys])
    for (layer, _, kind), g in zip(keys, grads):
        want = g[0].norm(dim=-1).flip(0)[: max_lag + 1].numpy()
        got = curve[curve.key == f"rnn.l{layer}.grad_{kind}"].sort_values("lag")["mean"].to_numpy()
        assert np.allclose(got, want, rtol=1e-4, atol=1e-9), (layer, kind)


def test_half_life_recovers_a_known_decay():
    lags = np.arange(0, 60)
    curve = pd.DataFrame({"key": "rnn.l0.grad_c", "layer": 0, "kind": "grad_c", "lag": lags,
                          "geo_mean": 3.0 * 0.5 ** (lags / 7.0)})
    hl = half_lives(curve).iloc[0]
    assert hl["half_life"] == pytest.approx(7.0, rel=1e-6) and not hl["exploding"]
    assert hl["lag_to_1pct"] == 1 + int(np.ceil(7.0 * np.log2(100)))
    grow = curve.assign(geo_mean=0.5 ** (-lags / 7.0))
    assert half_lives(grow).iloc[0]["exploding"] and np.isinf(half_lives(grow).iloc[0]["half_life"])


def test_gradient_norms_from_a_run(tmp_path, tiny_vocab):
    ck = char_model("lstm", tiny_vocab)
    run = record(ck, "if (a) { b; }\n" * 40, tmp_path / "run", grad=True, dtype="float32", progress=False)
    norms = gradient_norms(run)
    assert set(norms.columns) == {"rnn.l0.grad_h", "rnn.l0.grad_c", "rnn.l1.grad_h", "rnn.l1.grad_c"}
    for k in norms.columns:
        assert np.allclose(norms[k], np.linalg.norm(np.asarray(run[k], np.float64), axis=1))
    no_grad = record(ck, "if (a) { b; }\n" * 40, tmp_path / "plain", progress=False)
    with pytest.raises(RnnscopeError, match="record with `rnnscope probe ... --grad`"):
        gradient_norms(no_grad)


def test_decay_needs_a_long_enough_text(tiny_vocab):
    ck = char_model("gru", tiny_vocab)
    with pytest.raises(RnnscopeError, match="needs at least"):
        gradient_decay(ck.model, tiny_vocab.encode("abc" * 10), max_lag=50, progress=False)


def test_a_nan_model_gives_nan_gradients_not_numbers(tmp_path, tiny_vocab):
    """A model whose weights hold NaN: the decay curve and the half-life say so (NaN, flagged), never
    'inf, not exploding'; per-step norms are NaN, counted in attrs, not 0."""
    ck = char_model("lstm", tiny_vocab)
    with torch.no_grad():
        ck.model.rnn.weight_hh_l0[3, 2] = float("nan")
    ids = tiny_vocab.encode(("if (a, b) { c; }\n" * 6)[:90])
    curve = gradient_decay(ck.model, ids, positions=4, max_lag=20, warmup=4, progress=False)
    assert curve["nonfinite"].gt(0).any() and curve["geo_mean"].isna().any()
    hl = half_lives(curve)
    assert hl["nonfinite"].any()
    assert hl.loc[hl["nonfinite"], "half_life"].isna().all()
    run = record(ck, "if (a) { b; }\n" * 10, tmp_path / "nan", grad=True, dtype="float32", progress=False)
    norms = gradient_norms(run)
    # every step but the last (whose top-layer h no loss reaches) is NaN, and counted as such
    assert norms.iloc[:-1].isna().all().all()
    assert all(v >= len(norms) - 1 for v in norms.attrs["nonfinite"].values())


def test_half_life_of_an_overflowing_curve_is_exploding_and_nan():
    lags = np.arange(0, 10)
    y = np.exp(lags.astype(float))
    y[-1] = np.inf
    curve = pd.DataFrame({"key": "rnn.l0.grad_h", "layer": 0, "kind": "grad_h", "lag": lags, "geo_mean": y})
    hl = half_lives(curve).iloc[0]
    assert hl["nonfinite"] and hl["exploding"] and np.isnan(hl["half_life"])
