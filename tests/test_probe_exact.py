"""Every recorded state, gate and gradient against an independent float64 unrolled loop."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnscope import zoo
from rnnscope.probe import Probe, parse_key, replay, workspace
from reference import unrolled
from rnnscope.zoo import RnnscopeError

CASES = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn-tanh": (nn.RNN, {}),
    "rnn-relu-nobias": (nn.RNN, {"nonlinearity": "relu", "bias": False}),
    "lstm-bidir-batchfirst": (nn.LSTM, {"bidirectional": True, "batch_first": True}),
    "gru-bidir": (nn.GRU, {"bidirectional": True}),
    "lstm-proj": (nn.LSTM, {"proj_size": 4}),
    "lstm-nobias-3layers": (nn.LSTM, {"bias": False, "num_layers": 3}),
    "gru-batchfirst": (nn.GRU, {"batch_first": True}),
}


def _check(m, x, hx=None, unbatched=False):
    with Probe(m, grad=True) as p:
        out, _ = m(x, hx)
        w = torch.randn_like(out)
        (out * w).sum().backward()
    if unbatched:
        x = x.unsqueeze(1 if not m.batch_first else 0)
        hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        w, out = w.unsqueeze(1 if not m.batch_first else 0), out.unsqueeze(1 if not m.batch_first else 0)
    ref_out, ref, deltas = unrolled(m, x, hx, perturb=True)
    (ref_out * w.double()).sum().backward()
    assert (out.double() - ref_out).abs().max() < 1e-5
    expected = {"LSTM": 6, "GRU": 4, "RNN": 1}[type(m).__name__] + (2 if isinstance(m, nn.LSTM) else 1)
    assert len(p.trace) == m.num_layers * (2 if m.bidirectional else 1) * expected
    for key in p.trace:
        k = parse_key(key)
        got = p.trace[key].double()
        if k["kind"].startswith("grad_"):
            want = deltas[(k["layer"], k["reverse"], k["kind"][5:])].grad
            scale = want.abs().max().clamp_min(1e-12)
            assert ((got - want).abs().max() / scale) < 1e-5, key
        else:
            # 1e-5, relative once |value| > 1: a trained LSTM's counter cells reach |c| ~ 100, where
            # float32 itself (an unrolled float32 loop too) is off by ~1e-5 * |c|
            want = ref[(k["layer"], k["reverse"], k["kind"])]
            assert ((got - want).abs() / want.abs().clamp_min(1)).max() < 1e-5, key
        assert got.shape == want.shape


SPAN = replay.CHUNK_ROWS


@pytest.fixture
def lstm_paths(monkeypatch):
    """``use(rows)``: replay in spans of ``rows``; at the default span an LSTM reads oneDNN's
    workspace (``probe.workspace``), at others it replays its gates. Returns what each LSTM
    direction's workspace read gave (None: fell back)."""
    seen = []
    read = workspace.lstm_forward

    def spy(*a, **kw):
        r = read(*a, **kw)
        seen.append(r is not None)
        return r
    monkeypatch.setattr(workspace, "lstm_forward", spy)

    def use(rows):
        if rows != SPAN:
            monkeypatch.setattr(workspace, "ENABLED", False)
            monkeypatch.setattr(replay, "CHUNK_ROWS", rows)
        return seen
    return use


def _expect_path(m, seen, rows):
    """An LSTM without projections at the default span must have read the workspace, every direction."""
    on = isinstance(m, nn.LSTM) and not m.proj_size and rows == SPAN and torch.backends.mkldnn.is_available()
    assert seen == [True] * len(seen) and bool(seen) == on


@pytest.mark.parametrize("rows", [replay.CHUNK_ROWS, 4, 7])   # spans of 1 and 2 steps (batch 3)
@pytest.mark.parametrize("case", CASES)
def test_random_weights(case, rows, lstm_paths):
    seen = lstm_paths(rows)
    torch.manual_seed(hash(case) % 1000)
    cls, kw = CASES[case]
    kw = {"num_layers": 2, **kw}
    m = cls(5, 6, **kw)
    x = torch.randn(3, 11, 5) if m.batch_first else torch.randn(11, 3, 5)
    _check(m, x)
    _expect_path(m, seen, rows)


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn-tanh", "lstm-proj", "lstm-bidir-batchfirst"])
def test_user_initial_state(case):
    torch.manual_seed(1)
    cls, kw = CASES[case]
    m = cls(5, 6, num_layers=2, **kw)
    D, P = (2 if m.bidirectional else 1), (getattr(m, "proj_size", 0) or 6)
    h0 = torch.randn(2 * D, 3, P)
    hx = (h0, torch.randn(2 * D, 3, 6)) if isinstance(m, nn.LSTM) else h0
    x = torch.randn(3, 9, 5) if m.batch_first else torch.randn(9, 3, 5)
    _check(m, x, hx)


def test_unbatched_input():
    torch.manual_seed(2)
    m = nn.LSTM(5, 6, num_layers=2)
    _check(m, torch.randn(9, 5), unbatched=True)


@pytest.mark.parametrize("rows", [replay.CHUNK_ROWS, 64])     # 64: the replay runs in 3 spans
@pytest.mark.parametrize("name", sorted(zoo.shipped()))
def test_trained_zoo_weights_on_real_text(name, rows, lstm_paths):
    seen = lstm_paths(rows)
    ck = zoo.load(f"zoo:{name}")
    sample = "linux.c" if name.endswith("linux") else "shakespeare.txt"
    text = (zoo.SAMPLES / sample).read_text()[:150]
    x = ck.model.embed(ck.vocab.encode(text)).detach()
    _check(ck.model.rnn, x)
    _expect_path(ck.model.rnn, seen, rows)


def test_trained_weights_through_the_whole_model_with_a_real_loss():
    """grad_h through embedding, recurrence and head, against the reference with the same loss."""
    ck = zoo.load("zoo:lstm-linux")
    ids = ck.vocab.encode((zoo.SAMPLES / "linux.c").read_text()[:120])
    with Probe(ck.model, grad=True) as p:
        logits = ck.model(ids)
        nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
    emb = ck.model.embed(ids).detach()
    out, _, deltas = unrolled(ck.model.rnn, emb, perturb=True)
    head = ck.model.head
    ref_logits = out @ head.weight.double().T + head.bias.double()
    nn.functional.cross_entropy(ref_logits[0, :-1], ids[0, 1:], reduction="sum").backward()
    for layer in (0, 1):
        for kind in ("h", "c"):
            want = deltas[(layer, False, kind)].grad
            got = p.trace[f"rnn.l{layer}.grad_{kind}"].double()
            assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_model_is_left_exactly_as_it_was_even_on_error():
    m = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 5, batch_first=True))
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6, 3)
    ref, _ = m(x)
    with pytest.raises(ValueError, match="boom"):
        with Probe(m, grad=True, param_grads=False):
            m(x)
            raise ValueError("boom")
    gru = m[1]
    assert "forward" not in gru.__dict__ and m.training
    assert all(p.requires_grad for p in m.parameters())
    assert not gru._forward_hooks and not gru._forward_pre_hooks and not gru._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m(x)[0], ref)


def test_a_refused_probe_touches_nothing():
    m = nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 4))
    m[1].forward = lambda *a: "user's own"
    with pytest.raises(RnnscopeError, match="module 1 already has an instance-level forward"):
        with Probe(m):
            pass
    assert "forward" not in m[0].__dict__ and m[1].forward() == "user's own"


def test_nested_modules_are_named_by_their_qualified_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleDict({"lstm": nn.LSTM(3, 4, bidirectional=True)})
            self.decoder = nn.GRU(8, 5, num_layers=2)

        def forward(self, x):
            return self.decoder(self.encoder["lstm"](x)[0])[0]
    net = Net()
    with Probe(net) as p:
        net(torch.randn(7, 2, 3))
    keys = set(p.trace)
    assert {"encoder.lstm.l0.c", "encoder.lstm.l0_reverse.f", "decoder.l1.z", "decoder.l0.n"} <= keys
    assert p.trace["decoder.l1.h"].shape == (2, 7, 5)


def test_calls_with_carried_state_concatenate_along_time():
    torch.manual_seed(3)
    m = nn.LSTM(4, 6, num_layers=2, batch_first=True)
    x = torch.randn(2, 12, 4)
    with Probe(m) as whole:
        m(x)
    with Probe(m) as parts:
        _, s = m(x[:, :5])
        m(x[:, 5:], s)
    assert len(parts.calls) == 2
    for key in whole.trace:
        assert torch.allclose(parts.trace[key], whole.trace[key], atol=1e-6), key
    with Probe(m, carry=True) as carried:      # the probe carries state itself
        m(x[:, :5])
        m(x[:, 5:])
    assert torch.allclose(carried.trace["l1.c"], whole.trace["l1.c"], atol=1e-6)
    with Probe(m, carry=True), pytest.raises(RnnscopeError, match="carried state has batch 2, this call has batch 3"):
        m(x[:, :5])
        m(torch.randn(3, 4, 4))


def test_kinds_limits_what_is_kept(monkeypatch):
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    with Probe(m, kinds=["c"]) as p:
        m(x)
    assert sorted(p.trace) == sorted(f"l{i}{r}.{k}" for i in (0, 1) for r in ("", "_reverse") for k in "ch")
    with Probe(m) as full:
        m(x)
    # h alone: the plain kernel's outputs are the trace, nothing is read from a workspace or replayed
    monkeypatch.setattr(workspace, "lstm_forward", lambda *a, **kw: pytest.fail("read a workspace"))
    monkeypatch.setattr(replay, "lstm_states", lambda *a, **kw: pytest.fail("replayed the gates"))
    with Probe(m, kinds=["h"]) as only:
        m(x)
    assert sorted(only.trace) == ["l0.h", "l0_reverse.h", "l1.h", "l1_reverse.h"]
    for k in only.trace:
        assert (only.trace[k] - full.trace[k]).abs().max() < 1e-6


def test_state_gradients_without_touching_parameter_grads():
    m = nn.GRU(3, 4, num_layers=2)
    with Probe(m, grad=True, param_grads=False) as p:
        m(torch.randn(5, 2, 3))[0].sum().backward()
    assert all(q.grad is None for q in m.parameters())
    assert p.trace["l0.grad_h"].abs().sum() > 0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(RnnscopeError, match="has no nn.RNN, nn.LSTM or nn.GRU"):
        Probe(nn.Linear(3, 3))
    m = nn.LSTM(3, 4)
    with Probe(m, grad=True) as p:
        m(torch.randn(5, 2, 3))
    with pytest.raises(RnnscopeError, match="no gradient has reached.*backward"):
        p.trace["l0.grad_h"]
    with pytest.raises(KeyError):
        p.trace["l3.h"]


@pytest.mark.parametrize("batch", [3, 1])          # batch 1 takes the compiled adjoint loops (LSTM, GRU, RNN)
@pytest.mark.parametrize("case", list(CASES))
def test_parameter_and_input_gradients_equal_pytorch_autograd(case, batch):
    """With grad=True the probe's backward replaces the fused kernel's; the caller's .grad must not change."""
    torch.manual_seed(7)
    cls, kw = CASES[case]
    m = cls(5, 6, **{"num_layers": 2, **kw})
    x = (torch.randn(batch, 8, 5) if m.batch_first else torch.randn(8, batch, 5)).requires_grad_()
    D, P = (2 if m.bidirectional else 1), (getattr(m, "proj_size", 0) or 6)
    L = m.num_layers
    h0 = torch.randn(L * D, batch, P, requires_grad=True)
    c0 = torch.randn(L * D, batch, 6, requires_grad=True)
    hx = (h0, c0) if isinstance(m, nn.LSTM) else h0

    def run():
        out, state = m(x, hx)
        hn = state[0] if isinstance(state, tuple) else state
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + (hn ** 2).sum()
        if isinstance(state, tuple):
            loss = loss + state[1].sin().sum()
        leaves = [x, h0] + ([c0] if isinstance(m, nn.LSTM) else []) + list(m.parameters())
        return torch.autograd.grad(loss, leaves)
    want = run()
    with Probe(m, grad=True):
        got = run()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_onednn_and_plain_linear_agree():
    from rnnscope.probe import gemm
    torch.manual_seed(0)
    x, w, b = torch.randn(3000, 700), torch.randn(900, 700), torch.randn(900)     # big enough for oneDNN
    assert gemm.Linear(w, b).fast and x.numel() * 900 >= gemm.MIN_MACS
    want = x.double() @ w.double().T + b.double()
    assert (gemm.linear(x, w, b).double() - want).abs().max() < 1e-3
    assert (torch.nn.functional.linear(x, w, b).double() - want).abs().max() < 1e-3
    assert gemm.linear(x.double(), w.double(), b.double()).dtype == torch.float64     # falls back
    a, c = torch.randn(50, 8), torch.randn(50, 6)
    assert torch.allclose(gemm.t_matmul(a, c), a.T @ c, atol=1e-5)


def test_onednn_paths_agree_with_float64():
    """The replay's packed weights with oneDNN's activation post-ops, and the weight gradients'
    oneDNN inner-product backward (wide operands) beside plain mm (narrow ones)."""
    from rnnscope.probe import gemm
    torch.manual_seed(1)
    x, w, b = torch.randn(2048, 600), torch.randn(800, 600) / 25, torch.randn(800)
    pre = x.double() @ w.double().T + b.double()
    for act, ref in (("sigmoid", torch.sigmoid), ("tanh", torch.tanh), (None, lambda t: t)):
        lin = gemm.Linear(w, b, rows=1024, activation=act)
        assert lin.fast
        for rows in (1024, 7):          # 7 rows fall back to F.linear + the activation in torch
            assert (lin(x[:rows]).double() - ref(pre[:rows])).abs().max() < 1e-5, (act, rows)
    a, wide, narrow = torch.randn(3000, 512), torch.randn(3000, gemm.WIDE + 44), torch.randn(3000, 8)
    got = gemm.t_matmuls(a, wide, narrow)
    for g, other in zip(got, (wide, narrow)):
        want = a.double().T @ other.double()
        assert g.shape == want.shape and ((g.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("inp,hid,batch,steps", [
    (300, 64, 2, 5),        # 4H = 256: oneDNN pads the gates' rows to 272
    (7, 256, 1, 4),         # H = 256: padded cell and state rows; one sequence
    (513, 100, 5, 3),       # input wider than the state, H not a multiple of 16
    (16, 17, 64, 2),
    (3, 8, 4, 1),           # one step: the only cell is c_n
])
def test_workspace_layout_across_shapes(inp, hid, batch, steps, lstm_paths):
    """oneDNN's workspace layout depends on every size (page-aligned regions, padded rows): each
    shape must be read, and read right."""
    seen = lstm_paths(SPAN)
    torch.manual_seed(inp + hid)
    m = nn.LSTM(inp, hid, num_layers=2)
    _check(m, torch.randn(steps, batch, inp), (torch.randn(2, batch, hid), torch.randn(2, batch, hid)))
    assert seen == [True, True]                    # both layers read from the workspace


def test_a_workspace_layout_that_does_not_check_out_is_never_read(lstm_paths, monkeypatch):
    """Another oneDNN could lay its workspace out differently: the per-call check must catch it,
    warn once, and the probe replays the gates instead, still exact."""
    seen = lstm_paths(SPAN)
    monkeypatch.setattr(workspace, "_good_ld", lambda n: -(-n // 16) * 16 + 32)     # a wrong row padding
    monkeypatch.setattr(workspace, "_warned", False)
    torch.manual_seed(3)
    m = nn.LSTM(5, 64, num_layers=2)
    with pytest.warns(RuntimeWarning, match="layout the probe does not know; replaying"):
        _check(m, torch.randn(9, 3, 5))
    assert seen and not any(seen)


def test_the_callers_own_backward_through_a_recording_probe():
    """Probe(grad=False) while the caller trains: the workspace path keeps the fused kernel's
    autograd graph, so parameter and input gradients are PyTorch's own."""
    torch.manual_seed(4)
    m = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 7, 5, requires_grad=True)

    def grads():
        out, (h_n, c_n) = m(x)
        loss = (out * torch.linspace(-1, 1, 12)).sum() + c_n.square().sum()
        return torch.autograd.grad(loss, [x, *m.parameters()])
    want = grads()
    with Probe(m) as p:
        got = grads()
    assert "l1_reverse.c" in p.trace and not any(k.startswith("grad_") for k in p.trace)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_workspace_and_replay_agree_on_random_shapes(lstm_paths, monkeypatch):
    """The workspace layout is inferred from oneDNN's source, so sweep sizes around its paddings
    (rows rounded to 16 floats and kept off multiples of 256, regions rounded to pages) and
    compare every state with the replay's, under torch.inference_mode as well."""
    import random
    rng = random.Random(0)
    seen = lstm_paths(SPAN)
    for trial in range(24):
        T, B = rng.randint(1, 30), rng.choice([1, 2, 3, 7, 16, 33])
        I, H = rng.randint(1, 600), rng.choice([1, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 257, 384])
        torch.manual_seed(trial)
        m = nn.LSTM(I, H, bias=rng.random() < 0.8)
        x, hx = torch.randn(T, B, I), (torch.randn(1, B, H), torch.randn(1, B, H))
        seen.clear()
        with torch.inference_mode(), Probe(m) as fast:
            m(x, hx)
        assert seen == [True], (T, B, I, H)
        with monkeypatch.context() as mp:
            mp.setattr(workspace, "ENABLED", False)
            with torch.no_grad(), Probe(m) as slow:
                m(x, hx)
        assert seen == [True], (T, B, I, H)             # the replay read no workspace
        for key in slow.trace:
            want = slow.trace[key]
            assert (fast.trace[key] - want).abs().max() <= 1e-5 * max(1.0, want.abs().max()), (key, T, B, I, H)


@pytest.mark.parametrize("case", ["lstm", "gru-bidir", "rnn-tanh", "lstm-bidir-batchfirst", "lstm-proj"])
@pytest.mark.parametrize("sort", [False, True])
def test_packed_sequences_of_different_lengths(case, sort, lstm_paths):
    """PackedSequence input: outputs and final states equal PyTorch's; every recorded state of
    sequence b over its own length equals the float64 reference run on that sequence alone (the
    reverse direction starting from its own last element), and NaN past its end. An LSTM runs
    padded through oneDNN and is read from its workspace; the others run PyTorch's packed kernel."""
    seen = lstm_paths(SPAN)
    torch.manual_seed(5)
    cls, kw = CASES[case]
    m = cls(5, 6, **{"num_layers": 2, **kw})
    lengths = [7, 3, 9, 1] if not sort else [9, 7, 3, 1]
    B, D = len(lengths), (2 if m.bidirectional else 1)
    P = getattr(m, "proj_size", 0) or 6
    x = torch.randn(9, B, 5)
    h0 = torch.randn(2 * D, B, P)
    hx = (h0, torch.randn(2 * D, B, 6)) if isinstance(m, nn.LSTM) else h0
    seq = pack_padded_sequence(x, lengths, enforce_sorted=sort)
    want_out, want_state = m(seq, hx)
    with torch.no_grad(), Probe(m) as p:
        out, state = m(seq, hx)
    assert torch.equal(out.batch_sizes, want_out.batch_sizes)
    assert (out.data - want_out.data).abs().max() < 1e-6
    pairs = zip(state, want_state) if isinstance(state, tuple) else [(state, want_state)]
    for a, b in pairs:
        assert (a - b).abs().max() < 1e-6
    for b, n in enumerate(lengths):
        one = (hx[0][:, b:b + 1], hx[1][:, b:b + 1]) if isinstance(hx, tuple) else hx[:, b:b + 1]
        xb = x[:n, b:b + 1] if not m.batch_first else x[:n, b:b + 1].transpose(0, 1)   # the module's layout
        _, ref, _ = unrolled(m, xb, one)
        for key in p.trace:
            k = parse_key(key)
            got = p.trace[key][b].double()
            want = ref[(k["layer"], k["reverse"], k["kind"])][0]
            assert (got[:n] - want).abs().max() < 1e-5, (key, b)
            assert torch.isnan(got[n:]).all(), (key, b)
    _expect_path(m, seen, SPAN)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_the_callers_own_backward_through_packed_input(cls):
    torch.manual_seed(6)
    m = cls(5, 6, num_layers=2, bidirectional=True)
    x = torch.randn(8, 3, 5, requires_grad=True)

    def grads():
        out, state = m(pack_padded_sequence(x, [4, 8, 2], enforce_sorted=False))
        padded, _ = pad_packed_sequence(out)
        h_n = state[0] if isinstance(state, tuple) else state
        loss = (padded * torch.linspace(-1, 1, 12)).sum() + h_n.square().sum()
        if isinstance(state, tuple):
            loss = loss + state[1].sin().sum()
        return torch.autograd.grad(loss, [x, *m.parameters()])
    want = grads()
    with Probe(m) as p:
        got = grads()
    assert p.trace["l1_reverse.h"].shape == (3, 8, 6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("case", ["lstm", "gru-bidir", "rnn-tanh", "lstm-bidir-batchfirst", "lstm-proj"])
@pytest.mark.parametrize("batch", [4, 1])          # batch 1 takes the whole-loop compiled adjoints
def test_packed_sequences_state_and_parameter_gradients(case, batch):
    """grad=True on packed input: grad_h/grad_c of sequence b over its own length equal the float64
    reference's on that sequence alone, with the loss's terms on the packed output and on the final
    states (which sit at each sequence's own end); parameter and input gradients equal PyTorch's."""
    torch.manual_seed(8)
    cls, kw = CASES[case]
    m = cls(5, 6, **{"num_layers": 2, **kw})
    lengths = [6, 2, 8, 5][:batch] if batch > 1 else [7]
    B, D, T = len(lengths), (2 if m.bidirectional else 1), max(lengths)
    P = getattr(m, "proj_size", 0) or 6
    x = torch.randn(T, B, 5, requires_grad=True)
    h0 = torch.randn(2 * D, B, P, requires_grad=True)
    c0 = torch.randn(2 * D, B, 6, requires_grad=True)
    hx = (h0, c0) if isinstance(m, nn.LSTM) else h0
    w_out = torch.randn(T, B, D * P)

    def loss_of(out, state):
        loss = (pad_packed_sequence(out, total_length=T)[0] * w_out).sum()
        h_n = state[0] if isinstance(state, tuple) else state
        loss = loss + (h_n * torch.linspace(-1, 1, h_n.numel()).view_as(h_n)).sum()
        return loss + (state[1].sin().sum() if isinstance(state, tuple) else 0)

    def run():
        out, state = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        leaves = [x, h0] + ([c0] if isinstance(m, nn.LSTM) else []) + list(m.parameters())
        return torch.autograd.grad(loss_of(out, state), leaves)
    want = run()
    with Probe(m, grad=True) as p:
        got = run()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    for b, n in enumerate(lengths):
        one = (h0[:, b:b + 1], c0[:, b:b + 1]) if isinstance(m, nn.LSTM) else h0[:, b:b + 1]
        xb = x[:n, b:b + 1] if not m.batch_first else x[:n, b:b + 1].transpose(0, 1)
        out, ref, deltas = unrolled(m, xb, tuple(t.detach() for t in one) if isinstance(one, tuple) else one.detach(),
                                    perturb=True)
        out_tm = out if not m.batch_first else out.transpose(0, 1)
        loss = (out_tm * w_out[:n, b:b + 1].double()).sum()
        # the final states of this sequence, as the module returns them: each layer's h (and c) at
        # its own last step of each direction, weighted as in loss_of
        weights = torch.linspace(-1, 1, 2 * D * B * P).view(2 * D, B, P)[:, b].double()
        for layer in range(2):
            for d in range(D):
                idx = layer * D + d
                h_seq = ref[(layer, d == 1, "h")]                 # [1, n, P]; the reverse direction ends at t = 0
                loss = loss + ((h_seq[0, -1] if d == 0 else h_seq[0, 0]) * weights[idx]).sum()
                if isinstance(m, nn.LSTM):
                    c_seq = ref[(layer, d == 1, "c")]
                    loss = loss + (c_seq[0, -1] if d == 0 else c_seq[0, 0]).sin().sum()
        loss.backward()
        for key in p.trace:
            k = parse_key(key)
            if not k["kind"].startswith("grad_"):
                continue
            got_b = p.trace[key][b].double()
            want_b = deltas[(k["layer"], k["reverse"], k["kind"][5:])].grad[0]
            scale = want_b.abs().max().clamp_min(1e-12)
            assert ((got_b[:n] - want_b).abs().max() / scale) < 1e-5, (key, b)
            assert torch.isnan(got_b[n:]).all(), (key, b)
