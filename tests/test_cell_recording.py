"""How a step loop's steps are kept (probe.cellrows): over several preallocated blocks, a batch that
shrinks, a state detached mid-loop with frozen weights (the input made a leaf only where nothing
else gives the step a graph), and a second backward that accumulates; every state bit for bit
against the cell's own outputs, every gradient against float64 autograd through the same loop."""
import copy

import pytest
import torch
from torch import nn

from rnnscope.probe import Probe, cellrows

STEPS, CUT = 60, 41                  # 60 steps span blocks of 16, 32 and 64; the state is detached at 41
BATCH = [3] * 20 + [2] * 25 + [1] * 15


def loop(cell, xs, keep):
    """``xs [T, 3, in]``, the batch ``BATCH[t]`` at step t, the state detached at ``CUT``; ``keep(t,
    h, c)`` sees each step's outputs. Returns the loss, a fixed weighting of every h and c."""
    st, loss = None, 0
    gen = torch.Generator().manual_seed(5)
    for t, x in enumerate(xs):
        b = BATCH[t]
        if st is not None:
            st = tuple(s[:b] for s in st)
            if t == CUT:
                st = tuple(s.detach() for s in st)
        h, c = st = cell(x[:b], st)
        keep(t, h, c)
        w = torch.randn(2, b, h.shape[-1], generator=gen).to(h.dtype)
        loss = loss + (h * w[0]).sum() + (c * w[1]).sum()
    return loss


def reference(cell, xs, backwards: int):
    """Float64 autograd through the same loop: ``(h, c, dL/dh, dL/dc)``, each a list of ``[b_t, units]``."""
    m64 = copy.deepcopy(cell).double()
    hs, cs = [], []

    def keep(t, h, c):
        h.retain_grad(), c.retain_grad()
        hs.append(h), cs.append(c)
    loss = loop(m64, xs.double(), keep)
    for _ in range(backwards):
        loss.backward(retain_graph=True)
    return hs, cs, [h.grad for h in hs], [c.grad for c in cs]


def recorded(p, kind: str, t: int) -> torch.Tensor:
    v = p.trace[f"l0.{kind}"][:, t]
    assert torch.isnan(v[BATCH[t]:]).all()
    return v[:BATCH[t]]


@pytest.mark.parametrize("param_grads", [True, False])
def test_blocks_a_shrinking_batch_a_cut_and_two_backwards(param_grads):
    torch.manual_seed(0)
    cell, xs = nn.LSTMCell(5, 7), torch.randn(STEPS, 3, 5)
    outs = []
    with Probe(cell, grad=True, param_grads=param_grads) as p:
        loss = loop(cell, xs, lambda t, h, c: outs.append((h.detach(), c.detach())))
        loss.backward(retain_graph=True)
        loss.backward()
    assert len(p.cell_calls) == 1 and p.trace["l0.h"].shape == (3, STEPS, 7)
    assert len(p.cell_calls[0].store.blocks) == 3
    hs, cs, ghs, gcs = reference(cell, xs, backwards=2)
    for t, (h, c) in enumerate(outs):
        assert torch.equal(recorded(p, "h", t), h) and torch.equal(recorded(p, "c", t), c)   # the cell's own
        assert (recorded(p, "c", t).double() - cs[t]).abs().max() < 1e-5
        for kind, want in (("grad_h", ghs[t]), ("grad_c", gcs[t])):
            got = recorded(p, kind, t).double()
            assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1e-12), (kind, t)
    # the cut stops the gradient: dL/dc_{CUT-1} is only what the loss reads of c there
    assert gcs[CUT - 1].abs().sum() > 0 and not torch.equal(gcs[CUT - 1], gcs[CUT - 2])


def leaves(loss) -> list[torch.Tensor]:
    """Every tensor the backward of ``loss`` accumulates a gradient into."""
    seen, todo, out = set(), [loss.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            out.append(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)
    return out


@pytest.mark.parametrize("param_grads", [True, False])
def test_an_input_is_made_a_leaf_only_where_nothing_else_gives_a_graph(param_grads):
    """Weights that need a gradient give every step a graph, so no input is made a leaf (one would
    cost a product with W_ih per step in the backward); frozen, the first step and the first after
    the cut are, so the hooks see dL/dh at every step all the same."""
    torch.manual_seed(1)
    cell, xs = nn.LSTMCell(5, 7), torch.randn(STEPS, 3, 5)
    with Probe(cell, grad=True, param_grads=param_grads) as p:
        loss = loop(cell, xs, lambda t, h, c: None)
        got = leaves(loss)
        loss.backward()
    params = {id(q) for q in cell.parameters()}
    if param_grads:
        assert len(got) == 4 and {id(v) for v in got} == params
    else:
        assert [tuple(v.shape) for v in got if id(v) not in params] in ([(3, 5), (2, 5)], [(2, 5), (3, 5)])
    assert p.trace["l0.grad_h"][:BATCH[-1], -1].abs().min() > 0 and p.trace["l0.grad_c"][:3, 0].abs().min() > 0


def test_a_kind_read_is_a_copy_of_the_blocks():
    rows = cellrows.StepRows(["h", "c"], [torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.float64)], 2,
                             torch.device("cpu"))
    for t in range(40):
        rows.add([torch.full((2, 3), float(t)), torch.full((2, 1), t + 0.5, dtype=torch.float64)], 2)
    h, c = rows.kind("h"), rows.kind("c")
    assert h.dtype == torch.float32 and c.dtype == torch.float64 and h.shape == (2, 40, 3) and h.is_contiguous()
    assert torch.equal(h[1, :, 0], torch.arange(40.0)) and torch.equal(c[0, :, 0], torch.arange(40.0) + 0.5)
    h.zero_()
    assert rows.kind("h")[0, -1, 0] == 39
