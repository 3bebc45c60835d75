"""Step loops (nn.LSTMCell / GRUCell / RNNCell, an nn.GRU one step at a time, declared cells):
every state, gate and gradient against a float64 reference run of the same loop (tests/steploops.py)."""
import numpy as np
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.probe import Probe, cells, parse_key, state_key
from steploops import (AttnDecoderRNN, Captioner, Dropouts, FrameModel, InputFeedDecoder, RefDeclared, RLCore,
                       TacotronStep, TwoLSTMCells, reference)

F = nn.functional


def compare(p, refs, tol=1e-5) -> int:
    """Each recorded key of each reference module against its steps, to ``tol`` relative; rows past a
    step's batch are NaN. Returns how many keys were compared."""
    n = 0
    for name, ref in refs.items():
        kinds = [k for k in ref.steps[0] if not k.startswith("delta_")]
        for kind in kinds + [f"grad_{k[6:]}" for k in ref.steps[0] if k.startswith("delta_")]:
            got = p.trace[state_key(name, 0, False, kind)].double()
            assert got.shape[1] == len(ref.steps), (name, kind)
            for t, st in enumerate(ref.steps):
                if kind.startswith("grad_"):
                    d = st[f"delta_{kind[5:]}"]
                    want = d.grad if d.grad is not None else torch.zeros_like(d)
                else:
                    want = st[kind].detach()
                b = want.shape[0]
                err = (got[:b, t] - want).abs()
                scale = (want.abs().max().clamp_min(1e-12) if kind.startswith("grad_") else want.abs().clamp_min(1))
                assert (err / scale).max() < tol, (name, kind, t, float((err / scale).max()))
                assert torch.isnan(got[b:, t]).all()
            n += 1
    return n


def check_loop(model, run, seed=0, replace=None, dtype=torch.float32):
    """``run(model, dtype) -> out``: the loop inside ``Probe(grad=True)`` against its float64 reference,
    with a fixed random weighting of the outputs as the loss. Returns the probe."""
    torch.manual_seed(seed)
    with Dropouts(model) as drops, Probe(model, grad=True) as p:
        out = run(model, dtype)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * w.to(out.dtype)).sum().backward()
    assert not any("forward" in m.__dict__ for m in model.modules())          # left as it was
    m64, refs = reference(model, replace)
    drops.replay(m64)
    out64 = run(m64, torch.float64)
    (out64 * w.double()).sum().backward()
    assert (out.double() - out64).abs().max() < 1e-5
    assert compare(p, refs) == len([k for k in p.trace if parse_key(k)["module"] in refs])
    return p


def test_every_builtin_cell_records_its_own_outputs_bit_for_bit():
    """Odd sizes (a row of 7 units vectorises differently from the whole [B, H] block), batch 1 and 5."""
    for cls, kw in ((nn.LSTMCell, {}), (nn.GRUCell, {}), (nn.RNNCell, {}), (nn.RNNCell, {"nonlinearity": "relu"}),
                    (nn.GRUCell, {"bias": False})):
        for B in (1, 5):
            torch.manual_seed(B)
            cell, xs = cls(3, 7, **kw), torch.randn(6, B, 3)

            def loop():
                st, hs = None, []
                for x in xs:
                    st = cell(x, st)
                    hs.append(st)
                return hs
            plain = loop()
            with Probe(cell) as p:
                seen = loop()
            lstm = cls is nn.LSTMCell
            for got, want in zip(seen, plain):
                assert all(torch.equal(a, b) for a, b in zip(got, want)) if lstm else torch.equal(got, want)
            assert torch.equal(p.trace["l0.h"], torch.stack([s[0] if lstm else s for s in seen], 1))
            if lstm:
                assert torch.equal(p.trace["l0.c"], torch.stack([s[1] for s in seen], 1))
            assert "forward" not in cell.__dict__


def test_captioning_decoder_with_attention_and_a_shrinking_batch():
    torch.manual_seed(0)
    m = Captioner().train()
    feats, caps, lengths = torch.randn(4, 6, 6), torch.randint(0, 11, (4, 7)), [7, 6, 4, 2]
    p = check_loop(m, lambda mod, dt: mod(feats.to(dt), caps, lengths))
    h = p.trace["cell.l0.h"]
    assert h.shape == (4, 6, 8) and torch.isnan(h[3, 1:]).all() and not torch.isnan(h[0]).any()
    assert len(p.cell_calls) == 1


def test_opennmt_stacked_lstm_with_input_feeding_and_dropout_between_layers():
    torch.manual_seed(1)
    m = InputFeedDecoder().train()
    memory, tgt = torch.randn(3, 5, 7), torch.randint(0, 9, (3, 6))
    p = check_loop(m, lambda mod, dt: mod(memory.to(dt), tgt))
    assert {"rnn.layers.0.l0.grad_c", "rnn.layers.1.l0.o"} <= set(p.trace)


def test_tutorial_attn_decoder_gru_called_one_step_at_a_time():
    torch.manual_seed(2)
    m = AttnDecoderRNN()
    src, tgt = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3, 4))
    p = check_loop(m, lambda mod, dt: mod(src, tgt))
    assert p.trace["gru.l0.z"].shape == (3, 4, 6) and len(p.calls) == 5     # the encoder, then one call a step
    assert p.trace["encoder.l0.grad_h"].shape == (3, 5, 6)


def test_rl_core_with_done_masks_between_steps():
    torch.manual_seed(3)
    m = RLCore()
    obs, done = torch.randn(7, 3, 4), (torch.rand(7, 3) < 0.3).float()
    check_loop(m, lambda mod, dt: mod(obs.to(dt), done.to(dt)))


def test_tacotron_step_with_two_cells_and_dropout_on_the_state():
    torch.manual_seed(4)
    m = TacotronStep().train()
    memory, frames = torch.randn(2, 5, 5), torch.randn(2, 6, 4)
    p = check_loop(m, lambda mod, dt: mod(memory.to(dt), frames.to(dt)))
    assert {"att_rnn.l0.grad_h", "dec_rnn.l0.grad_c"} <= set(p.trace)


def test_two_stacked_lstm_cells_in_float64():
    torch.manual_seed(5)
    m = TwoLSTMCells().double()
    x = torch.randn(3, 8, 1, dtype=torch.float64)
    p = check_loop(m, lambda mod, dt: mod(x))
    assert p.trace["l2.l0.h"].dtype == torch.float64


def test_rnn_cell_relu_unbatched_without_a_first_state():
    torch.manual_seed(6)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.out = nn.RNNCell(3, 5, nonlinearity="relu"), nn.Linear(5, 2)

        def forward(self, xs):                  # xs [T, 3]: one unbatched sequence
            h, outs = None, []
            for x in xs:
                h = self.cell(x, h)
                outs.append(self.out(h))
            return torch.stack(outs)
    m, xs = Loop(), torch.randn(9, 3)
    p = check_loop(m, lambda mod, dt: mod(xs.to(dt)))
    assert p.trace["cell.l0.h"].shape == (1, 9, 5) and (p.trace["cell.l0.h"] == 0).any()


def test_a_model_called_once_per_frame_by_the_callers_loop():
    torch.manual_seed(7)
    m, frames = FrameModel(), torch.randn(10, 2, 5)

    def run(mod, dt):
        state, outs = None, []
        for f in frames.to(dt):
            y, state = mod(f, state)
            outs.append(y)
        return torch.stack(outs)
    p = check_loop(m, run)
    assert p.trace["cell.l0.h"].shape == (2, 10, 6) and len(p.cell_calls) == 1


def test_state_detached_between_chunks_stops_the_gradient_there():
    torch.manual_seed(8)
    m, frames = FrameModel(), torch.randn(8, 2, 5)

    def run(mod, dt):
        state, outs = None, []
        for t, f in enumerate(frames.to(dt)):
            if t == 4:                                     # truncated BPTT: a new chunk
                state = tuple(s.detach() for s in state)
            y, state = mod(f, state)
            outs.append(y)
        return torch.stack(outs)
    p = check_loop(m, run)
    with Probe(m, grad=True) as q:
        y = run(m, torch.float32)
        y[:4].sum().backward()                             # a loss on the first chunk only
    g = q.trace["cell.l0.grad_h"]
    assert g[:, :4].abs().sum() > 0 and torch.equal(g[:, 4:], torch.zeros_like(g[:, 4:]))
    assert p.trace["cell.l0.grad_h"][:, 3].abs().sum() > 0


def test_new_sequences_and_a_batch_that_grows():
    torch.manual_seed(9)
    cell = nn.GRUCell(3, 4)
    with Probe(cell) as p:
        h = cell(torch.randn(3, 3))
        cell(torch.randn(3, 3), h)
        cell(torch.randn(2, 3))                                        # no state: a new sequence
        cell(torch.randn(5, 3), torch.zeros(5, 4))                     # zeros, a new batch: a new one
        cell(torch.randn(5, 3), torch.zeros(5, 4))                     # zeros, same batch: carried on
    assert [c["l0.h"].shape for c in p.cell_calls] == [(3, 2, 4), (2, 1, 4), (5, 2, 4)]
    with pytest.raises(rs.RnnscopeError, match="different batch sizes"):
        p.trace["l0.h"]
    with pytest.raises(rs.RnnscopeError, match="only shrink by dropping its last rows"), Probe(cell):
        h = cell(torch.randn(2, 3))
        cell(torch.randn(3, 3), torch.cat([h, h[:1]]))
    assert "forward" not in cell.__dict__                               # restored on the way out


def test_a_cell_whose_equations_do_not_reproduce_the_kernel_is_refused(monkeypatch):
    def wrong(m, x, h, c):
        out = cells._lstm(m, x, h, c)
        return {**out, "h": out["h"] * (1 + 1e-6)}
    monkeypatch.setitem(cells.BUILTIN, nn.LSTMCell, (("h", "c"), "ifgo", wrong))
    cell = nn.LSTMCell(3, 4)
    with pytest.raises(rs.RnnscopeError, match="do not reproduce the kernel"), Probe(cell):
        cell(torch.randn(2, 3))
    assert "forward" not in cell.__dict__


def test_probe_refuses_a_model_without_any_recurrence_and_a_taken_forward():
    with pytest.raises(rs.RnnscopeError, match="nor a cell"):
        Probe(nn.Linear(2, 2))
    cell = nn.LSTMCell(2, 2)
    with Probe(cell), pytest.raises(rs.RnnscopeError, match="already recorded by another Probe"):
        Probe(cell).__enter__()
    assert "forward" not in cell.__dict__


from handwritten_cells import (CellLoop, IndRNNCell, LayerNormLSTMCell, MultiplicativeLSTMCell,  # noqa: E402
                               indrnn_textbook, ln_lstm_gates, ln_lstm_textbook, mlstm_gates, mlstm_textbook)

HANDWRITTEN = {     # the cell, its kinds, its gate function, an explicit first state, its gates, the textbook
    "layernorm-lstm": (LayerNormLSTMCell, ("h", "c"), ln_lstm_gates, False, "ifgo", ln_lstm_textbook),
    "mlstm": (MultiplicativeLSTMCell, ("h", "c"), mlstm_gates, True, "mifou", mlstm_textbook),
    "indrnn": (IndRNNCell, ("h",), None, False, "", indrnn_textbook),
}


@pytest.mark.parametrize("case", HANDWRITTEN)
def test_handwritten_cells_declared_with_rs_cell(case):
    cls, kinds, gates, zeros, gate_kinds, textbook = HANDWRITTEN[case]
    torch.manual_seed(10)
    cell = rs.cell(cls(4, 5), kinds=kinds, gates=gates)
    m, xs = CellLoop(cell, 5, zeros), torch.randn(7, 3, 4)
    p = check_loop(m, lambda mod, dt: mod(xs.to(dt)),
                   replace={"cell": lambda c64: RefDeclared(c64, kinds, textbook)})
    assert set(p.trace) == {f"cell.l0.{k}" for k in (*kinds, *gate_kinds, *(f"grad_{k}" for k in kinds))}
    with Probe(m) as q:                                    # the declared states are the cell's own outputs
        m(xs)
    assert "forward" not in cell.__dict__
    with torch.no_grad():
        st, hs = None, []
        for x in xs:
            st = cell(x, st if st is not None or not zeros else (x.new_zeros(3, 5),) * 2)
            hs.append(st[0] if isinstance(st, tuple) else st)
    assert torch.equal(q.trace["cell.l0.h"], torch.stack(hs, 1))


def test_the_decorator_form_and_its_bad_specs():
    @rs.cell(kinds=("h", "c"), gates=ln_lstm_gates)
    class Mine(LayerNormLSTMCell):
        pass
    torch.manual_seed(11)
    m = CellLoop(Mine(3, 4), 4)
    with Probe(m) as p:
        m(torch.randn(5, 2, 3))
    assert p.trace["cell.l0.f"].shape == (2, 5, 4)

    wrong_kinds = CellLoop(rs.cell(LayerNormLSTMCell(3, 4), kinds=("h",)), 4)
    with pytest.raises(rs.RnnscopeError, match=r"declared with kinds \('h',\) but its forward returned a tuple of 2"), \
            Probe(wrong_kinds):
        wrong_kinds(torch.randn(5, 2, 3))
    assert "forward" not in wrong_kinds.cell.__dict__

    def off(m, x, state=None):
        return {**ln_lstm_gates(m, x, state), "c": torch.zeros(x.shape[0], 4)}
    lying = CellLoop(rs.cell(LayerNormLSTMCell(3, 4), kinds=("h", "c"), gates=off), 4)
    with pytest.raises(rs.RnnscopeError, match="does not reproduce the cell's own 'c'"), Probe(lying):
        lying(torch.randn(5, 2, 3))

    def broken(m, x, state=None):
        raise IndexError("tuple index out of range")
    failing = CellLoop(rs.cell(LayerNormLSTMCell(3, 4), kinds=("h", "c"), gates=broken), 4)
    with pytest.raises(rs.RnnscopeError, match="gate function of cell cell: IndexError at .*test_cells.py"), \
            Probe(failing):
        failing(torch.randn(5, 2, 3))
    with pytest.raises(rs.RnnscopeError, match=r"are not \('h',\) or \('h', 'c'\)"):
        rs.cell(kinds=("c", "h"))


class CharLoop(nn.Module):
    """A character model written as a loop: ids ``[1, T]`` -> logits ``[1, T, V]``; ``skip`` drops the first step."""

    def __init__(self, skip=False):
        super().__init__()
        self.emb, self.cell, self.out, self.skip = nn.Embedding(128, 5), nn.LSTMCell(5, 6), nn.Linear(6, 128), skip

    def forward(self, ids):
        st, outs = None, []
        for t in range(int(self.skip), ids.shape[1]):
            st = self.cell(self.emb(ids[:, t]), st)
            outs.append(self.out(st[0]))
        return torch.stack(outs, 1)


def encode(s):
    return torch.tensor([[ord(c) for c in s]])


def test_record_a_step_loop_model_into_a_run(tmp_path):
    torch.manual_seed(12)
    m, text = CharLoop(), "a loop over cells, recorded"
    run = rs.record(m, text, tmp_path / "r", encode=encode, grad=True, dtype="float32", progress=False)
    with Probe(m, grad=True) as p:
        logits = m(encode(text))
        F.cross_entropy(logits[0, :-1], encode(text)[0, 1:], reduction="sum").backward()
    assert run.manifest["model"]["modules"]["cell"]["type"] == "LSTMCell"
    for key in ("cell.l0.h", "cell.l0.c", "cell.l0.f", "cell.l0.grad_h", "cell.l0.grad_c"):
        np.testing.assert_allclose(np.asarray(run[key]), p.trace[key][0].numpy(), rtol=1e-5, atol=1e-6)


def test_record_refuses_a_loop_whose_steps_are_not_the_encoders(tmp_path):
    with pytest.raises(rs.RnnscopeError, match="took 10 steps .* over 11 steps of the encoder"):
        rs.record(CharLoop(skip=True), "hello world", tmp_path / "r", encode=encode, loss=None, progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(rs.RnnscopeError, match="records it a whole document per call"):
        rs.record(CharLoop(), "hello world", tmp_path / "r", encode=encode, chunk=4, progress=False)


def test_a_state_of_the_wrong_batch_is_refused_as_the_kernel_refuses_it():
    cell = nn.LSTMCell(3, 4)
    with pytest.raises(RuntimeError):
        cell(torch.randn(5, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))
    with Probe(cell), pytest.raises(RuntimeError, match="state of shape"):
        cell(torch.randn(5, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))


def test_kinds_keep_only_what_was_asked():
    cell = nn.LSTMCell(3, 4)
    with Probe(cell, kinds=["c"], grad=True) as p:
        h, c = cell(torch.randn(2, 3))
        (h.sum() + c.sum()).backward()
    assert set(p.trace) == {"l0.h", "l0.c", "l0.grad_h", "l0.grad_c"}
    assert torch.equal(p.trace["l0.grad_h"], torch.ones(2, 1, 4))       # the loss is the sum of h


def test_a_fused_lstm_called_one_step_at_a_time_reads_as_one_sequence():
    from reference import unrolled
    torch.manual_seed(13)
    m, x = nn.LSTM(3, 5, batch_first=True), torch.randn(2, 6, 3)
    w = torch.randn(2, 6, 5)
    with Probe(m, grad=True) as p:
        st, outs = None, []
        for t in range(6):
            o, st = m(x[:, t:t + 1], st)
            outs.append(o)
        (torch.cat(outs, 1) * w).sum().backward()
    out, ref, deltas = unrolled(m, x, perturb=True)
    (out * w.double()).sum().backward()
    assert len(p.calls) == 6
    for kind in "hcifgo":
        assert (p.trace[f"l0.{kind}"].double() - ref[(0, False, kind)]).abs().max() < 1e-5, kind
    for kind in "hc":
        want = deltas[(0, False, kind)].grad
        assert ((p.trace[f"l0.grad_{kind}"].double() - want).abs().max() / want.abs().max()) < 1e-5, kind


def test_a_torchscript_cell_is_refused_in_one_line():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(3, 4)

        def forward(self, x):
            st = self.cell(x[0])
            for t in range(1, x.shape[0]):
                st = self.cell(x[t], st)
            return st[0]
    with pytest.raises(rs.RnnscopeError, match="cell cell is TorchScript"):
        Probe(torch.jit.script(Loop()))


def test_a_probe_shows_its_cells_and_sequences():
    cell = nn.GRUCell(3, 4)
    with Probe(cell) as p:
        cell(torch.randn(2, 3))
    assert "<model>: GRUCell (a cell: one step per call)" in repr(p) and "1 cell sequence(s)" in repr(p)
    assert repr(p.cell_calls[0]) == "CellCall of 1 step(s), batch 2: l0.h, l0.r, l0.z, l0.n"


def test_an_unbatched_lstm_cell_with_gradients():
    torch.manual_seed(14)
    cell, xs = nn.LSTMCell(3, 4), torch.randn(5, 3)

    def run(mod, dt):
        st, hs = None, []
        for x in xs.to(dt):
            st = mod(x, st)
            hs.append(st[0] * st[1])             # the head reads c too
        return torch.stack(hs)
    p = check_loop(cell, run)
    assert p.trace["l0.grad_c"].shape == (1, 5, 4)


CELL_SPEC = '''
import torch
from torch import nn


class CharLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.out = nn.Embedding(128, 5), nn.LSTMCell(5, 6), nn.Linear(6, 128)

    def forward(self, ids):
        st, outs = None, []
        for t in range(ids.shape[1]):
            st = self.cell(self.emb(ids[:, t]), st)
            outs.append(self.out(st[0]))
        return torch.stack(outs, 1)


def build():
    torch.manual_seed(3)
    return CharLoop(), lambda s: torch.tensor([[ord(c) for c in s]])
'''


def test_the_command_line_records_a_loop_over_a_cell(tmp_path, capsys):
    """``rnnscope probe --model file.py:fn`` on a model whose only recurrence is an LSTMCell loop: the
    Run holds the cell's keys, equal to the same model probed in memory; ``--modules`` names the cell."""
    from rnnscope.cli import main
    from rnnscope.probe.specs import load
    (tmp_path / "loop.py").write_text(CELL_SPEC)
    (tmp_path / "t.txt").write_text("a loop, probed from the command line\n")
    spec = f"{tmp_path / 'loop.py'}:build"
    assert main(["probe", "--model", spec, "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r"),
                 "--dtype", "float32", "--modules", "cell"]) == 0, capsys.readouterr().err
    run = rs.open_run(tmp_path / "r")
    subject = load(spec)
    text = (tmp_path / "t.txt").read_text()
    with torch.no_grad(), Probe(subject.model) as p:
        subject.model(subject.encoder(text))
    assert {"cell.l0.h", "cell.l0.c", "cell.l0.i"} <= set(run.keys())
    np.testing.assert_array_equal(np.asarray(run["cell.l0.c"]), p.trace["cell.l0.c"][0].numpy())
    assert main(["probe", "--model", spec, "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"),
                 "--modules", "nope"]) == 2
    assert "choose from 'cell'" in capsys.readouterr().err
