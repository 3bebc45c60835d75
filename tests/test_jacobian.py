"""One-step Jacobians from the recorded gates equal autograd through the float64 unrolled reference;
the stacked Jacobian is block lower triangular with the per-layer ones on its diagonal; the QR
Lyapunov exponents equal the explicit product's and recover a planted linear RNN's known exponents."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import char_model
from reference import unrolled
from rnnscope.analysis.jacobian import jacobian_blocks, recorded_layers, step_jacobians
from rnnscope.analysis.lyapunov import layer_exponents, lyapunov, spectrum
from rnnscope.cli import main


class Net(nn.Module):
    """ids -> embedding -> the recurrent module under test -> logits (what ``recorded_layers`` calls)."""

    def __init__(self, rnn: nn.Module, vocab: int = 7):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, rnn.input_size), rnn
        self.head = nn.Linear((getattr(rnn, "proj_size", 0) or rnn.hidden_size) * (1 + rnn.bidirectional), vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


MODULES = {
    "rnn_tanh": lambda: nn.RNN(5, 6, num_layers=2, batch_first=True),
    "rnn_relu": lambda: nn.RNN(5, 6, num_layers=2, batch_first=True, nonlinearity="relu"),
    "gru": lambda: nn.GRU(5, 6, num_layers=2, batch_first=True),
    "lstm": lambda: nn.LSTM(5, 6, num_layers=2, batch_first=True),
    "lstm_proj": lambda: nn.LSTM(5, 6, num_layers=2, batch_first=True, proj_size=3),
}


def _stacked_step(m, x_t, state):
    """The whole stack's state after one step from ``state`` (flat, layer by layer, (h, c) within
    a layer), through the reference: autograd of this is the stacked Jacobian."""
    lstm, L, H = isinstance(m, nn.LSTM), m.num_layers, m.hidden_size
    P = getattr(m, "proj_size", 0) or H
    S = P + H if lstm else P
    parts = state.view(L, S)
    hx = (parts[:, None, :P].contiguous(), parts[:, None, P:].contiguous()) if lstm else parts[:, None, :].contiguous()
    _, states, _ = unrolled(m, x_t, hx=hx)
    kinds = ("h", "c") if lstm else ("h",)
    return torch.cat([states[(layer, False, k)][0, 0] for layer in range(L) for k in kinds])


@pytest.mark.parametrize("kind", list(MODULES))
def test_closed_form_equals_autograd_and_the_stack_is_block_lower_triangular(kind):
    torch.manual_seed(1)
    net = Net(MODULES[kind]()).eval()
    m, lstm = net.rnn, kind.startswith("lstm")
    ids = torch.randint(0, 7, (1, 9))
    x = net.embed(ids).detach().double()
    _, ref, _ = unrolled(m, x)
    layers = recorded_layers(net, ids)
    assert [la.key for la in layers] == ["rnn.l0", "rnn.l1"]
    S = layers[0].size
    for t in (0, 4, 8):
        prev = [torch.cat([ref[(la, False, k)][0, t - 1] if t else torch.zeros(ref[(la, False, k)].shape[-1],
                                                                              dtype=torch.float64)
                           for k in (("h", "c") if lstm else ("h",))]) for la in range(2)]
        full = torch.autograd.functional.jacobian(lambda s: _stacked_step(m, x[:, t:t + 1], s), torch.cat(prev))
        assert full.abs().max() > 0.05                                        # not a vacuous comparison
        assert torch.equal(full[:S, S:], torch.zeros(S, S, dtype=torch.float64))   # block lower triangular
        for la, layer in enumerate(layers):
            block = full[la * S:(la + 1) * S, la * S:(la + 1) * S]
            # the closed form on the reference's own float64 states: exact
            st = {k: ref[(la, False, k)][0, t:t + 1] for k in layer.st}
            P = layer.st["h"].shape[1]
            exact = step_jacobians(layer.family, layer.w_hh, layer.b_hh, st, prev[la][None, :P],
                                   prev[la][None, P:] if lstm else None, layer.w_hr, layer.nonlinearity)[0]
            assert torch.allclose(exact, block, rtol=1e-10, atol=1e-12), (kind, t, la)
            # from the gates Probe recorded in float32
            recorded = next(jacobian_blocks(layer, t, t + 1))[0]
            assert torch.allclose(recorded, block, rtol=1e-4, atol=1e-5), (kind, t, la)
        # eigenvalues of the stack: the union of the diagonal blocks'
        blocks = [full[i * S:(i + 1) * S, i * S:(i + 1) * S] for i in range(2)]
        union = torch.cat([torch.linalg.eigvals(b) for b in blocks])
        assert np.allclose(np.sort(torch.linalg.eigvals(full).abs().numpy()), np.sort(union.abs().numpy()), atol=1e-8)


def test_product_of_the_stack_has_the_per_layer_products_on_its_diagonal_and_their_exponents():
    torch.manual_seed(2)
    net = Net(nn.GRU(5, 6, num_layers=2, batch_first=True)).eval()
    ids = torch.randint(0, 7, (1, 400))
    layers = recorded_layers(net, ids)
    J = [torch.cat(list(jacobian_blocks(la))) for la in layers]             # [T, 6, 6] each
    stacked = torch.zeros(400, 12, 12, dtype=torch.float64)
    stacked[:, :6, :6], stacked[:, 6:, 6:] = J[0], J[1]
    # the off-diagonal block: layer 1's dependence on layer 0's previous state, through layer 0's output
    stacked[:, 6:, :6] = torch.randn(400, 6, 6, dtype=torch.float64) * 0.3
    prod = torch.eye(12, dtype=torch.float64)
    for t in range(12):
        prod = stacked[t] @ prod
    p0 = torch.linalg.multi_dot(list(J[0][:12].flip(0)))
    p1 = torch.linalg.multi_dot(list(J[1][:12].flip(0)))
    assert torch.allclose(prod[:6, :6], p0) and torch.allclose(prod[6:, 6:], p1)
    assert torch.equal(prod[:6, 6:], torch.zeros(6, 6, dtype=torch.float64))
    whole = lyapunov([stacked], 12, skip=50)
    union = np.sort(np.concatenate([lyapunov([j], 6, skip=50) for j in J]))[::-1]
    assert np.allclose(whole[:4], union[:4], atol=0.03), (whole, union)


def test_qr_exponents_equal_the_explicit_product():
    torch.manual_seed(3)
    net = Net(nn.LSTM(5, 4, num_layers=1, batch_first=True)).eval()
    ids = torch.randint(0, 7, (1, 300))
    layer = recorded_layers(net, ids)[0]
    J = torch.cat(list(jacobian_blocks(layer)))                            # [300, 8, 8]
    # exactly: J_T..J_1 Q0 = Q R with R the product of the per-step R's, so log|R_ii| / T agree
    T, k = 20, 3
    Q0 = torch.linalg.qr(torch.randn(8, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    prod = torch.linalg.multi_dot(list(J[:T].flip(0)))
    direct = np.sort(torch.log(torch.linalg.qr(prod @ Q0).R.diagonal().abs()).numpy() / T)[::-1]
    assert np.allclose(lyapunov([J[:T]], k, seed=0), direct, rtol=1e-9, atol=1e-12)
    # and, over a longer text, the log singular values of the explicit product per step
    T = 120
    prod = torch.linalg.multi_dot(list(J[:T].flip(0)))
    sv = np.log(torch.linalg.svdvals(prod).numpy()[:2]) / T
    assert np.allclose(lyapunov([J[:T]], 2), sv, atol=0.02), (lyapunov([J[:T]], 2), sv)


def test_a_planted_linear_rnn_gives_its_known_exponents():
    """A relu RNN whose pre-activations stay positive is linear: ``h_t = W h_{t-1} + b_t``, ``J = W``.
    W is non-normal (triangular, permuted), so its singular values are not its exponents: the
    exponents are the logs of its eigenvalues' moduli."""
    s = np.array([0.95, 0.8, 0.6, 0.4, 0.25])
    W = np.diag(s) + np.triu(np.full((5, 5), 0.3), 1)
    perm = np.random.default_rng(0).permutation(5)
    W = W[perm][:, perm]
    rnn = nn.RNN(3, 5, batch_first=True, nonlinearity="relu")
    net = Net(rnn)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.tensor(W))
        rnn.weight_ih_l0.uniform_(0, 1)
        rnn.bias_ih_l0.fill_(1.0)
        rnn.bias_hh_l0.zero_()
        net.embed.weight.uniform_(0, 1)
    layer = recorded_layers(net, torch.randint(0, 7, (1, 600)))[0]
    assert (layer.st["h"] > 0).all()
    ex = layer_exponents(layer, 5, skip=50)
    assert np.allclose(ex, np.log(s), atol=0.01), (ex, np.log(s))
    assert np.linalg.svd(W, compute_uv=False)[0] > 1 > s[0]     # one step can stretch; the product shrinks


def test_spectrum_links_exponents_to_the_measured_decay(tiny_vocab):
    ck = char_model("lstm", tiny_vocab, seed=4)
    ids = tiny_vocab.encode("if (a, b) { c; }\nwhile (x) { y(); }\n" * 12)
    t = spectrum(ck.model, ids, k=4, samples=20, max_lag=30, warmup=5, positions=32)
    assert list(t.key) == ["rnn.l0", "rnn.l1"]
    assert t.loc[1, "reach_rate"] == t.loc[1, "lambda_1"] and t.loc[0, "reach_rate"] == t["lambda_1"].max()
    for r in t.itertuples():
        assert len(r.exponents) == 4 and r.exponents == sorted(r.exponents, reverse=True)
        assert r.predicted_half_life == pytest.approx(np.log(2) / -r.reach_rate) if r.reach_rate < 0 else np.isinf(r.predicted_half_life)
        assert np.isfinite(r.measured_half_life) and r.measured_half_life > 0 and np.isfinite(r.measured_half_life_c)
        assert np.isfinite(r.measured_tail_half_life) and r.measured_tail_half_life > 0
        assert 0 <= r.sv_above_1 <= 1 and r.sv_max_median > 0


def test_spectrum_command(tmp_path, tiny_checkpoint, capsys):
    text = tmp_path / "t.c"
    text.write_text("int f(int a) { return a; }\n" * 30)
    assert main([f"spectrum", str(tiny_checkpoint), "--text", str(text), "--exponents", "3", "--max-lag", "40",
                 "--positions", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == ["rnn.l0", "rnn.l1"] and len(rows[0]["exponents"]) == 3
    assert main(["spectrum", str(tiny_checkpoint), "--text", str(text), "--chars", "300", "--max-lag", "40", "--positions", "16"]) == 0
    out = capsys.readouterr().out
    assert "rnn.l1" in out and "predicted" in out and "measured" in out


@pytest.mark.parametrize("args, says", [
    (["--text", "missing.txt"], "does not exist"),
    (["--text", "{text}", "--exponents", "0"], "at least 1"),
    (["--text", "{short}"], "needs at least"),
    (["--text", "{alien}"], "outside the model's vocabulary"),
])
def test_spectrum_bad_input_is_one_line(tmp_path, tiny_checkpoint, capsys, args, says):
    files = {"text": "int f(int a) { return a; }\n" * 30, "short": "int a;\n", "alien": "int é;\n" * 60}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    args = [a.format(**{n: tmp_path / n for n in files}) for a in args]
    try:
        rc = main(["spectrum", str(tiny_checkpoint), *args])
    except SystemExit as e:             # argparse refuses before anything runs
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1 and err.startswith("rnnscope: error:")


def test_a_reverse_direction_is_the_forward_recurrence_over_the_reversed_text():
    torch.manual_seed(5)
    both = Net(nn.GRU(5, 6, batch_first=True, bidirectional=True)).eval()
    fwd = Net(nn.GRU(5, 6, batch_first=True)).eval()
    with torch.no_grad():
        fwd.embed.weight.copy_(both.embed.weight)
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(fwd.rnn, f"{n}_l0").copy_(getattr(both.rnn, f"{n}_l0_reverse"))
    ids = torch.randint(0, 7, (1, 30))
    rev = [la for la in recorded_layers(both, ids) if la.reverse]
    assert [la.key for la in rev] == ["rnn.l0_reverse"]
    want = torch.cat(list(jacobian_blocks(recorded_layers(fwd, ids.flip(1))[0])))
    assert torch.allclose(torch.cat(list(jacobian_blocks(rev[0]))), want, rtol=1e-5, atol=1e-6)
