"""A Probe and an Intervention on the same model, in either nesting order: the Probe records the
edited model's states, gates and gradients, which must equal the float64 unrolled reference run
with the same edits; leaving either block leaves the model as it was."""
import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnscope.analysis.intervene import Intervention
from rnnscope.errors import RnnscopeError
from rnnscope.probe import Probe, parse_key
from reference import unrolled

CASES = {   # edits below, above and beside recorded layers, in each family
    "lstm": (nn.LSTM, {}, [(0, False, "c"), (0, False, "g")]),
    "lstm-bidir": (nn.LSTM, {"bidirectional": True, "batch_first": True}, [(1, True, "h"), (1, False, "f")]),
    "lstm-proj": (nn.LSTM, {"proj_size": 4}, [(1, False, "h"), (0, False, "o")]),
    "gru": (nn.GRU, {}, [(0, False, "z"), (1, False, "h")]),
    "gru-bidir": (nn.GRU, {"bidirectional": True}, [(0, True, "n")]),
    "rnn": (nn.RNN, {"nonlinearity": "relu"}, [(1, False, "h")]),
}
H = 6


def _setup(case, B, seed=0):
    torch.manual_seed(seed)
    cls, kw, targets = CASES[case]
    m = cls(5, H, num_layers=2, **kw)
    P = kw.get("proj_size") or H
    edits, ref_edits = {}, {}
    for layer, rev, kind in targets:
        U = P if kind == "h" else H
        mask, value = torch.rand(B, U) < 0.4, torch.randn(B, U)
        edits[f"l{layer}{'_reverse' if rev else ''}.{kind}"] = (mask, value)
        ref_edits[(layer, rev, kind)] = (mask, value)
    return m, edits, ref_edits


def _blocks(m, edits, probe_outside):
    """``(probe, context)``: the Probe and the Intervention nested one way or the other."""
    probe, edit = Probe(m, grad=True), Intervention(m, edits)
    stack = contextlib.ExitStack()
    for block in ((probe, edit) if probe_outside else (edit, probe)):
        stack.enter_context(block)
    return probe, stack


def _close(got, want, what):
    """1e-5 relative to max(1, |x|), as tests/test_probe_exact.py checks states."""
    assert got.shape == want.shape, what
    assert ((got.double() - want).abs() / want.abs().clamp_min(1)).max() < 1e-5, what


def _want(ref, deltas, key, b=slice(None)):
    k = parse_key(key)
    if k["kind"].startswith("grad_"):
        return deltas[(k["layer"], k["reverse"], k["kind"][5:])].grad[b]
    return ref[(k["layer"], k["reverse"], k["kind"])][b]


@pytest.mark.parametrize("probe_outside", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_probe_records_the_edited_model_exactly(case, probe_outside):
    m, edits, ref_edits = _setup(case, B=3)
    x = torch.randn(3, 7, 5) if m.batch_first else torch.randn(7, 3, 5)
    probe, blocks = _blocks(m, edits, probe_outside)
    with blocks:
        out, _ = m(x)
        w = torch.randn_like(out)
        (out * w).sum().backward()
    assert "forward" not in m.__dict__
    ref_out, ref, deltas = unrolled(m, x, perturb=True, edits=ref_edits)
    (ref_out * w.double()).sum().backward()
    _close(out, ref_out, "output")
    per_dir = {"LSTM": 6 + 2, "GRU": 4 + 1, "RNN": 1 + 1}[type(m).__name__]       # states + gradients
    assert len(probe.trace) == 2 * (2 if m.bidirectional else 1) * per_dir
    for key in probe.trace:
        _close(probe.trace[key], _want(ref, deltas, key), key)


@pytest.mark.parametrize("probe_outside", [True, False])
@pytest.mark.parametrize("case", ["lstm", "lstm-bidir", "gru-bidir", "rnn"])
def test_probe_records_the_edited_model_on_packed_input(case, probe_outside):
    """Each sequence over its own length equals the reference run on it alone with its edits; NaN past its end."""
    lengths = [5, 2, 7]
    B, T = len(lengths), max(lengths)
    m, edits, ref_edits = _setup(case, B, seed=1)
    x = torch.randn(T, B, 5)
    w = torch.randn(T, B, (2 if m.bidirectional else 1) * H)
    probe, blocks = _blocks(m, edits, probe_outside)
    with blocks:
        out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        padded = pad_packed_sequence(out, total_length=T)[0]
        (padded * w).sum().backward()
    for b, n in enumerate(lengths):
        xb = x[:n, b:b + 1] if not m.batch_first else x[:n, b:b + 1].transpose(0, 1)
        one = {k: (mk[b:b + 1], v[b:b + 1]) for k, (mk, v) in ref_edits.items()}
        ref_out, ref, deltas = unrolled(m, xb, perturb=True, edits=one)
        ref_tm = ref_out if not m.batch_first else ref_out.transpose(0, 1)
        _close(padded[:n, b:b + 1], ref_tm, ("output", b))
        (ref_tm * w[:n, b:b + 1].double()).sum().backward()
        for key in probe.trace:
            got = probe.trace[key][b]
            _close(got[:n], _want(ref, deltas, key, 0), (key, b))
            assert torch.isnan(got[n:]).all(), (key, b)


@pytest.mark.parametrize("key,U", [("l1.c", H), ("l0.h", H), ("l1.f", H)])
def test_a_probe_sees_the_clamp_value_at_the_clamped_unit(key, U):
    torch.manual_seed(2)
    m = nn.LSTM(5, H, num_layers=2)
    mask = torch.zeros(U, dtype=torch.bool)
    mask[3] = True
    with torch.no_grad(), Intervention(m, {key: (mask, 0.75)}), Probe(m) as p:
        m(torch.randn(9, 2, 5))
    assert torch.equal(p.trace[key][..., 3], torch.full((2, 9), 0.75))
    with torch.no_grad(), Probe(m) as plain:
        m(torch.randn(9, 2, 5))
    assert not torch.equal(plain.trace[key][..., 3], torch.full((2, 9), 0.75))


def test_leaving_either_block_leaves_the_other_working_and_the_model_as_it_was():
    torch.manual_seed(3)
    m = nn.GRU(5, H, num_layers=2)
    x = torch.randn(6, 2, 5)
    plain, _ = m(x)
    mask = torch.ones(H, dtype=torch.bool)
    with Probe(m) as p:
        with Intervention(m, {"l0.h": (mask, 0.0)}):
            edited, _ = m(x)
        after, _ = m(x)                         # the Intervention left; the Probe still records
    assert "forward" not in m.__dict__
    assert not torch.allclose(edited, plain) and torch.allclose(after, plain, atol=1e-6)
    assert torch.equal(p.calls[0]["l0.h"], torch.zeros(2, 6, H)) and torch.allclose(p.calls[1]["l1.h"],
                                                                                      plain.transpose(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="boom"):
        with Intervention(m, {"l1.z": (mask, 0.5)}), Probe(m, grad=True, param_grads=False):
            m(x)
            raise ValueError("boom")
    assert "forward" not in m.__dict__ and all(q.requires_grad for q in m.parameters())
    assert torch.equal(m(x)[0], plain)


def test_two_probes_on_one_module_are_refused_and_touch_nothing():
    m = nn.LSTM(3, 4)
    with Intervention(m, {"l0.h": (torch.ones(4, dtype=torch.bool), 0.0)}), Probe(m):
        with pytest.raises(RnnscopeError, match="already recorded by another Probe"):
            with Probe(m):
                pass
        assert "forward" in m.__dict__
    assert "forward" not in m.__dict__
