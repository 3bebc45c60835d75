"""Interventions: edited forward passes equal the float64 unrolled reference with the same edits;
the model is untouched afterwards; ablation finds a unit that matters and ranks controls."""
import pytest
import torch
from torch import nn

from conftest import char_model
from rnnscope.analysis.intervene import Intervention, ablate, position_mask
from reference import unrolled
from rnnscope.zoo import load
from rnnscope.errors import RnnscopeError

CASES = [
    ("lstm", {}, [(1, False, "c"), (0, False, "h")]),
    ("lstm", {"proj_size": 5}, [(0, False, "h"), (1, False, "f")]),
    ("lstm", {"bidirectional": True, "batch_first": True}, [(0, True, "c"), (1, False, "o")]),
    ("gru", {}, [(0, False, "h"), (1, False, "z")]),
    ("gru", {"bidirectional": True}, [(1, True, "n")]),
    ("rnn", {"nonlinearity": "relu"}, [(1, False, "h")]),
    ("rnn", {"bias": False}, [(0, False, "h")]),
]


def _key(layer, rev, kind):
    return f"l{layer}{'_reverse' if rev else ''}.{kind}"


@pytest.mark.parametrize("arch,kw,targets", CASES)
def test_edited_forward_matches_unrolled_reference(arch, kw, targets):
    torch.manual_seed(0)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[arch]
    m = cls(6, 9, num_layers=2, **kw).eval()
    B, T = 3, 11
    x = torch.randn(B, T, 6) if m.batch_first else torch.randn(T, B, 6)
    P = kw.get("proj_size") or 9
    edits, ref_edits = {}, {}
    for layer, rev, kind in targets:
        U = P if kind == "h" else 9
        mask = torch.rand(B, U) < 0.4           # a different set of units per batch element
        value = torch.randn(B, U)
        edits[_key(layer, rev, kind)] = (mask, value)
        ref_edits[(layer, rev, kind)] = (mask, value)
    with Intervention(m, edits):
        out, state = m(x)
    ref_out, ref_states, _ = unrolled(m, x, edits=ref_edits)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    plain, _ = m(x)
    assert "forward" not in m.__dict__ and not torch.allclose(plain, out)   # restored; the edit did something


def test_empty_edit_changes_nothing(tiny_vocab):
    ck = char_model("lstm", tiny_vocab)
    ids = tiny_vocab.encode("if (a) { b, c; } # d\n" * 3)
    with torch.no_grad():
        base = ck.model(ids)
        with Intervention(ck.model, {"rnn.l1.h": (torch.zeros(16, dtype=torch.bool), 0.0)}):
            same = ck.model(ids)
    assert torch.allclose(base, same, atol=1e-6)


def test_bad_edits_are_refused(tiny_vocab):
    m = char_model("gru", tiny_vocab).model
    with pytest.raises(RnnscopeError, match="no state 'c'"):
        Intervention(m, {"rnn.l0.c": ([True] * 16, 0.0)})
    with pytest.raises(RnnscopeError, match="no such layer"):
        Intervention(m, {"rnn.l5.h": ([True] * 16, 0.0)})
    with pytest.raises(RnnscopeError, match="no recurrent module"):
        Intervention(m, {"decoder.l0.h": ([True] * 16, 0.0)})
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(RnnscopeError, match="edit mask has shape"):
        with Intervention(m, {"rnn.l0.h": ([True] * 3, 0.0)}):
            m(ids)
    assert "forward" not in m.rnn.__dict__


def test_ablating_the_zoo_comment_cell_hurts_comments_more_than_random_cells():
    """On the shipped lstm-linux model: the cell that tracks comments, held at its mean, costs more loss on
    comment characters than most random cells of the same layer (which cell is found here, from the
    data, not hard-coded)."""
    from rnnscope.analysis import features, find_neurons
    from rnnscope.probe import Probe
    ck = load("zoo:lstm-linux")
    text = open("zoo/samples/linux.c").read()[:6000]
    ids = ck.vocab.encode(text)
    with torch.no_grad(), Probe(ck.model, kinds=["c"]) as p:
        ck.model(ids)
    cells = {k: p.trace[k] for k in ("rnn.l0.c", "rnn.l1.c")}
    tab = find_neurons(cells, ["in_comment"], text=text, shifts=8, progress=False)
    best = tab.iloc[0]["unit"]
    pos = position_mask(text, features.in_comment(text))
    res = ablate(ck.model, ids, [best], pos, controls=30)
    target = res.iloc[0]
    assert target["role"] == "target" and len(res) == 31
    assert target["beats_controls"] >= 0.9, res.head()
    assert target["effect"] > 2 * abs(target["effect_elsewhere"])       # specific to comments


@pytest.mark.parametrize("arch,kw,targets", CASES)
def test_edited_packed_sequences_match_the_reference_per_sequence(arch, kw, targets):
    """PackedSequence input: each sequence's edited output and final state equal the float64
    reference run with the same edits on that sequence alone (reverse direction from its own end)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(1)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[arch]
    m = cls(6, 9, num_layers=2, **kw).eval()
    lengths, P = [5, 11, 2], kw.get("proj_size") or 9
    B, T = len(lengths), max(lengths)
    x = torch.randn(T, B, 6)
    edits, ref_edits = {}, {}
    for layer, rev, kind in targets:
        U = P if kind == "h" else 9
        mask, value = torch.rand(B, U) < 0.4, torch.randn(B, U)
        edits[_key(layer, rev, kind)] = (mask, value)
        ref_edits[(layer, rev, kind)] = (mask, value)
    with Intervention(m, edits):
        out, state = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)
    h_n = state[0] if isinstance(state, tuple) else state
    for b, n in enumerate(lengths):
        xb = x[:n, b:b + 1] if not m.batch_first else x[:n, b:b + 1].transpose(0, 1)
        one = {k: (mk[b:b + 1], v[b:b + 1]) for k, (mk, v) in ref_edits.items()}
        ref_out, ref_states, _ = unrolled(m, xb, edits=one)
        ref_out = ref_out if not m.batch_first else ref_out.transpose(0, 1)
        assert torch.allclose(padded[:n, b:b + 1].double(), ref_out, atol=1e-5), b
        for layer in range(2):
            for d in range(2 if m.bidirectional else 1):
                h = ref_states[(layer, d == 1, "h")][0]              # [n, P]
                want = h[-1] if d == 0 else h[0]                     # the reverse direction ends at t = 0
                got = h_n[layer * (2 if m.bidirectional else 1) + d, b]
                assert torch.allclose(got.double(), want, atol=1e-5), (b, layer, d)
                if isinstance(state, tuple):
                    c = ref_states[(layer, d == 1, "c")][0]
                    got_c = state[1][layer * (2 if m.bidirectional else 1) + d, b]
                    assert torch.allclose(got_c.double(), c[-1] if d == 0 else c[0], atol=1e-5), (b, layer, d)
    assert "forward" not in m.__dict__
