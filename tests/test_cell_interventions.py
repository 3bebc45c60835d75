"""Interventions on the cells of step loops (nn.LSTMCell / GRUCell / RNNCell, declared cells): the edited
loop against an independent float64 reference loop that applies the same edits (written here from the
textbook), alone and inside or around a Probe, values and gradients; no edit changes no bit; refusals."""
import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

import rnnscope as rs
from handwritten_cells import CellLoop, LayerNormLSTMCell, ln_lstm_gates
from rnnscope.probe import Intervention, Probe, state_key
from rnnscope.probe.cells import known_kinds
from rnnscope.probe.intervention import editable_modules
from steploops import Captioner, TwoLSTMCells, _Ref, reference
from test_cells import CharLoop, compare, encode       # an LSTMCell loop over characters; the step check


class EditedRef(_Ref):
    """A built-in cell in float64 from the textbook with ``edits`` ``{kind: (mask, value)}`` applied
    where an edit belongs: each gate after its nonlinearity, c before h is computed from it, h last;
    ``[batch, units]`` edits cut to the step's batch. A zero perturbation right after each state's edit:
    its gradient is the total dL/d(state), from where the edited state is used."""

    def __init__(self, m, edits):
        super().__init__(m)
        self.edits = edits

    def put(self, kind, v):
        if kind not in self.edits:
            return v
        mask, value = (torch.as_tensor(a) for a in self.edits[kind])
        mask = mask[:v.shape[0]] if mask.dim() == 2 else mask
        value = value[:v.shape[0]] if value.dim() == 2 else value
        return torch.where(mask, value.double(), v)

    def forward(self, x, hx=None):
        m, H, put = self.m, self.m.hidden_size, self.put
        zeros = torch.zeros(x.shape[0], H, dtype=torch.float64)
        lstm = isinstance(m, nn.LSTMCell)
        h, c = (hx if lstm else (hx, None)) if hx is not None else (zeros, zeros)
        ax, ah = x @ m.weight_ih.T + m.bias_ih, h @ m.weight_hh.T + m.bias_hh
        if lstm:
            i, f, g, o = (ax + ah).chunk(4, -1)
            st = {"i": put("i", torch.sigmoid(i)), "f": put("f", torch.sigmoid(f)), "g": put("g", torch.tanh(g)),
                  "o": put("o", torch.sigmoid(o))}
            st["c"] = put("c", st["f"] * c + st["i"] * st["g"])
            st = self._nudge(st, "c")
            st["h"] = put("h", st["o"] * torch.tanh(st["c"]))
        elif isinstance(m, nn.GRUCell):
            r = put("r", torch.sigmoid(ax[:, :H] + ah[:, :H]))
            z = put("z", torch.sigmoid(ax[:, H:2 * H] + ah[:, H:2 * H]))
            n = put("n", torch.tanh(ax[:, 2 * H:] + r * ah[:, 2 * H:]))
            st = {"r": r, "z": z, "n": n, "h": put("h", (1 - z) * n + z * h)}
        else:
            a = ax + ah
            st = {"h": put("h", torch.tanh(a) if m.nonlinearity == "tanh" else torch.relu(a))}
        st = self._nudge(st, "h")
        self.steps.append(st)
        return (st["h"], st["c"]) if lstm else st["h"]


def _edit(B, U, seed, rows=True):
    """A mask of ~40% of the units (different per row with ``rows``) and values off the state's range."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, U) if rows else (U,)
    return torch.rand(shape, generator=g) < 0.4, torch.randn(shape, generator=g, dtype=torch.float64) * 2


def _lstm_loop():
    torch.manual_seed(0)
    return TwoLSTMCells(H=5), lambda m, dt: m(torch.randn(3, 6, 1, generator=torch.Generator().manual_seed(1),
                                                         dtype=dt)), 3, 5


def _gru_loop():
    torch.manual_seed(2)
    return CellLoop(nn.GRUCell(4, 5), 5), lambda m, dt: m(torch.randn(6, 3, 4, generator=torch.Generator()
                                                                       .manual_seed(3), dtype=dt)), 3, 5


def _relu_loop():
    torch.manual_seed(4)
    return CellLoop(nn.RNNCell(4, 5, nonlinearity="relu"), 5), \
        lambda m, dt: m(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(5), dtype=dt)), 3, 5


def _captioner():
    """The batch shrinks from 4 to 1 as captions end (``h[:b_t]``): [batch, units] edits keep their first rows."""
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(7)
    feats, caps = torch.randn(4, 3, 6, generator=g), torch.randint(0, 11, (4, 7), generator=g)
    return Captioner().eval(), lambda m, dt: m(feats.to(dt), caps, [7, 5, 5, 2]), 4, 8


LOOPS = {"lstm": _lstm_loop, "gru": _gru_loop, "rnn_relu": _relu_loop, "captioner": _captioner}
CASES = [       # loop, {cell: kinds edited}; a [units] mask with a number for the kinds in ``flat``
    ("lstm", {"l1": "h"}, ()), ("lstm", {"l1": "c"}, ()), ("lstm", {"l2": "f"}, ()),
    ("lstm", {"l1": "ic", "l2": "ho"}, ("o",)),
    ("gru", {"cell": "h"}, ()), ("gru", {"cell": "r"}, ()), ("gru", {"cell": "nz"}, ("z",)),
    ("rnn_relu", {"cell": "h"}, ()), ("rnn_relu", {"cell": "h"}, ("h",)),
    ("captioner", {"cell": "c"}, ()), ("captioner", {"cell": "hg"}, ()),
]


def _edits(cells: dict, B, U, flat):
    """``({key: (mask, value)}, {cell: {kind: (mask, value)}})`` for the model and its reference."""
    keys, ref = {}, {}
    for n, (name, kinds) in enumerate(cells.items()):
        for j, kind in enumerate(kinds):
            mask, value = _edit(B, U, 10 * n + j, rows=kind not in flat)
            value = 0.75 if kind in flat else value
            keys[state_key(name, 0, False, kind)] = (mask, value)
            ref.setdefault(name, {})[kind] = (mask, torch.as_tensor(value, dtype=torch.float64))
    return keys, ref


def _run(model, run, keys, nesting):
    """The edited loop in float64 with a Probe(grad=True) ``inside`` or ``outside`` the Intervention; the
    loss is a fixed weighting ``w`` of the outputs. Returns ``(out, probe, w)``."""
    m = copy.deepcopy(model).double()
    with contextlib.ExitStack() as blocks:
        intervention, probe = Intervention(m, keys), Probe(m, grad=True)
        for block in ((intervention, probe) if nesting == "probe inside" else (probe, intervention)):
            blocks.enter_context(block)
        out = run(m, torch.float64)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (out * w).sum().backward()
    assert not any("forward" in mod.__dict__ for mod in m.modules())           # both left: the model as it was
    return out, probe, w


@pytest.mark.parametrize("nesting", ["probe inside", "probe outside"])
@pytest.mark.parametrize("loop,cells,flat", CASES)
def test_edited_cell_loop_matches_a_float64_reference_that_applies_the_same_edits(loop, cells, flat, nesting):
    model, run, B, U = LOOPS[loop]()
    keys, ref_edits = _edits(cells, B, U, flat)
    out, p, w = _run(model, run, keys, nesting)
    m64, refs = reference(model, {name: (lambda c64, e=e: EditedRef(c64, e)) for name, e in ref_edits.items()})
    out64 = run(m64, torch.float64)
    (out64 * w).sum().backward()
    assert (out - out64).abs().max() < 1e-10
    plain = run(copy.deepcopy(model).double(), torch.float64)
    assert (plain - out).abs().max() > 1e-3                                    # the edit did something
    assert compare(p, refs, tol=1e-10) == len(p.trace)      # every state, gate and gradient, every step
    edited_grads = 0
    for name, edits in ref_edits.items():        # the Probe holds the edited values themselves
        for kind, (mask, value) in edits.items():
            got = p.trace[state_key(name, 0, False, kind)]
            for t in range(got.shape[1]):
                b = int((~got[:, t].isnan().all(1)).sum())          # the step's batch
                m = mask[:b] if mask.dim() == 2 else mask.expand(b, U)
                v = value[:b] if value.dim() == 2 else value.expand(b, U)
                assert torch.equal(got[:b, t][m], v[m])
                if kind in "hc":                 # an edited unit's dL/dh comes from where the edited h is used
                    grad = p.trace[state_key(name, 0, False, f"grad_{kind}")]
                    edited_grads += int(grad[:b, t][m].abs().gt(1e-8).sum())
    assert edited_grads > 0 or not any(k in "hc" for ks in cells.values() for k in ks)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_edit_changes_no_bit(loop):
    """An Intervention whose masks are all False (every kind of every cell), alone or inside a Probe,
    leaves every output and every recorded state bit for bit as without it; float32."""
    model, run, B, U = LOOPS[loop]()
    torch.manual_seed(0)
    with torch.no_grad():
        plain = run(model, torch.float32)
        with Probe(model) as p0:
            probed = run(model, torch.float32)
    cells = {n: m for n, m in editable_modules(model).items() if not isinstance(m, nn.RNNBase)}
    keys = {state_key(n, 0, False, k): (torch.zeros(B, U, dtype=torch.bool), torch.randn(B, U))
            for n, m in cells.items() for k in known_kinds(m)}
    with torch.no_grad(), Intervention(model, keys):
        alone = run(model, torch.float32)
        with Probe(model) as p1:
            both = run(model, torch.float32)
    with torch.no_grad(), Intervention(model, {}):
        empty = run(model, torch.float32)
    assert torch.equal(plain, probed) and torch.equal(plain, alone) and torch.equal(plain, both)
    assert torch.equal(plain, empty)
    assert list(p0.trace) == list(p1.trace)
    for k in p0.trace:
        torch.testing.assert_close(p0.trace[k], p1.trace[k], rtol=0, atol=0, equal_nan=True)   # NaN past an end
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_an_h_edit_in_float32_is_exactly_the_kernels_step_then_where():
    """The kernel is an independent reference for an h edit (h is the last thing a step computes):
    the loop ``h, c = cell(x, (h, c)); h = where(mask, value, h)`` with PyTorch's own cell, bit for bit;
    and the Probe's dL/dh at each step is that loop's ``h.grad`` (autograd, retain_grad)."""
    torch.manual_seed(8)
    cell, xs = nn.LSTMCell(3, 6), torch.randn(7, 4, 3)
    mask, value = torch.rand(4, 6) < 0.5, torch.randn(4, 6)
    w = torch.randn(7, 4, 6)

    def loop():
        st, hs = None, []
        for x in xs:
            st = cell(x, st)
            hs.append(st[0])
        return torch.stack(hs)
    with Probe(cell, grad=True) as p, Intervention(cell, {"l0.h": (mask, value)}):
        out = loop()
        (out * w).sum().backward()
    st, hs = None, []
    for x in xs:
        h, c = cell(x, st)
        h = torch.where(mask, value, h)
        h.retain_grad()
        st = (h, c)
        hs.append(h)
    want = torch.stack(hs)
    (want * w).sum().backward()
    assert torch.equal(out, want) and torch.equal(p.trace["l0.h"], want.transpose(0, 1))
    got = p.trace["l0.grad_h"].transpose(0, 1)
    assert torch.allclose(got, torch.stack([h.grad for h in hs]), rtol=1e-6, atol=1e-7)
    with torch.no_grad(), Intervention(cell, {"l0.h": (mask[0], value[0])}):     # unbatched: [units] in, out
        h, c = cell(xs[0, 0], (want[0, 0], hs[0][0].new_ones(6)))
    with torch.no_grad():
        h0, c0 = cell(xs[0, 0], (want[0, 0], hs[0][0].new_ones(6)))
    assert h.shape == (6,) and torch.equal(h, torch.where(mask[0], value[0], h0)) and torch.equal(c, c0)


def test_a_declared_cell_edits_the_h_it_returns_and_refuses_the_rest():
    """``rs.cell``: its forward is the user's code; the h it returns is edited (exactly: its own step,
    then ``where``), the Probe records the edited h and the gates from the edited state; c and gates
    are refused in one line."""
    torch.manual_seed(9)
    cell = rs.cell(LayerNormLSTMCell(3, 5), kinds=("h", "c"), gates=ln_lstm_gates)
    model, xs = CellLoop(cell, 5, zeros=True), torch.randn(6, 2, 3)
    mask, value = torch.tensor([True, False, False, True, False]), 0.5
    with torch.no_grad(), Intervention(model, {"cell.l0.h": (mask, value)}), Probe(model) as p:
        out = model(xs)
    assert "forward" not in cell.__dict__
    with torch.no_grad():
        st, hs, fs = (xs.new_zeros(2, 5), xs.new_zeros(2, 5)), [], []
        for x in xs:
            fs.append(ln_lstm_gates(cell, x, st)["f"])
            h, c = cell(x, st)
            st = (torch.where(mask, torch.tensor(value), h), c)
            hs.append(st[0])
        assert torch.equal(out, model.head(torch.stack(hs)))
        assert torch.equal(p.trace["cell.l0.h"], torch.stack(hs, 1))
        assert torch.equal(p.trace["cell.l0.f"], torch.stack(fs, 1))
    for key in ("cell.l0.c", "cell.l0.i"):
        with pytest.raises(rs.RnnscopeError, match="inside its own forward.*only the h it returns"):
            Intervention(model, {key: (mask, value)})


def test_bad_cell_edits_are_refused_in_one_line():
    torch.manual_seed(10)
    model, xs = CellLoop(nn.LSTMCell(4, 5), 5), torch.randn(4, 3, 4)
    ok = torch.ones(5, dtype=torch.bool)
    for key, match in (("cell.l0.r", r"cell \(an nn.LSTMCell\) has no state 'r' — edit one of h, c, i, f, g, o"),
                       ("cell.l1.h", "one layer and one direction"),
                       ("cell.l0_reverse.c", "one layer and one direction"),
                       ("nope.l0.h", "no recurrent module"), ("cell.l0.grad_h", "no state 'grad_h'")):
        with pytest.raises(rs.RnnscopeError, match=match):
            Intervention(model, {key: (ok, 0.0)})
    gru = CellLoop(nn.GRUCell(4, 5), 5)
    with pytest.raises(rs.RnnscopeError, match=r"an nn.GRUCell\) has no state 'c' — edit one of h, r, z, n"):
        Intervention(gru, {"cell.l0.c": (ok, 0.0)})
    with pytest.raises(rs.RnnscopeError, match=r"edit mask has shape \[3\] for 5 units"), \
            Intervention(model, {"cell.l0.h": (ok[:3], 0.0)}):
        model(xs)
    with pytest.raises(rs.RnnscopeError, match=r"edit mask has shape \[2, 5\] for 5 units and batch 3"), \
            Intervention(model, {"cell.l0.c": (torch.ones(2, 5, dtype=torch.bool), 0.0)}):
        model(xs)                          # a batch larger than the edits' rows
    assert "forward" not in model.cell.__dict__
    model.cell.forward = lambda *a: None          # someone else's forward: refused, nothing touched
    mixed = nn.ModuleDict({"loop": model, "rnn": nn.LSTM(2, 2)})
    with pytest.raises(rs.RnnscopeError, match="instance-level forward that is not rnnscope's"):
        Intervention(mixed, {"loop.cell.l0.h": (ok, 0.0), "rnn.l0.h": ([True, True], 0.0)}).__enter__()
    assert "forward" not in mixed["rnn"].__dict__
    del model.cell.forward


def test_both_blocks_leave_the_cell_exactly_as_it_was_also_on_an_exception():
    torch.manual_seed(11)
    model, xs = CellLoop(nn.GRUCell(4, 5), 5), torch.randn(4, 3, 4)
    with torch.no_grad():
        plain = model(xs)
    edit = {"cell.l0.z": (torch.ones(5, dtype=torch.bool), 0.0)}
    with torch.no_grad(), Probe(model) as p:
        with pytest.raises(KeyError), Intervention(model, edit):
            model(xs)
            raise KeyError("inside")
        again = model(xs)                     # the Probe still records, the edit is gone
    assert torch.equal(again, plain)
    assert torch.equal(p.cell_calls[0]["cell.l0.z"], torch.zeros(3, 4, 5))     # recorded edited, then not
    assert p.cell_calls[1]["cell.l0.z"].abs().min() > 0
    with pytest.raises(KeyError), Intervention(model, edit):
        with Probe(model):
            model(xs)
            raise KeyError("inside")
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad(), Intervention(model, edit) as iv:
        with pytest.raises(rs.RnnscopeError, match="already recorded by another Probe"), Probe(model):
            Probe(model).__enter__()
        assert "cell.l0.z" in repr(iv) and "forward" in model.cell.__dict__
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(xs), plain)


def _char_loop_and_text():
    """An untrained char loop (ablate's arithmetic, not what it finds, is under test) and a feature."""
    text = "(a (b c) d) e (f (g) h) i j (k) " * 2
    torch.manual_seed(12)
    depth = np.cumsum([1 if ch == "(" else -1 if ch == ")" else 0 for ch in text]) > 0
    return CharLoop().eval(), encode(text), depth


def test_rs_ablate_on_an_lstmcell_char_loop():
    """``ablate`` works on a cell loop: the Intervention edits a [controls, units] batch of masks, the
    means come from the Probe; the target's row edits exactly its unit."""
    m, ids, depth = _char_loop_and_text()
    res = rs.ablate(m, ids, ["cell.l0.c:3"], depth, controls=5, mode="zero")
    assert len(res) == 6 and res.iloc[0]["role"] == "target"
    with torch.no_grad():
        mask = torch.zeros(6, dtype=torch.bool)
        mask[3] = True
        base = nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:], reduction="none")
        with Intervention(m, {"cell.l0.c": (mask, 0.0)}):
            edited = nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:], reduction="none")
    delta = (edited - base).double().numpy()
    assert abs(res.iloc[0]["effect"] - delta[depth[:-1]].mean()) < 1e-5
    assert abs(delta).max() > 1e-4
