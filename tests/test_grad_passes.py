"""The Run says where the state was detached: ``run.grad_passes`` lists each pass of a gradient Run
(start, end, reach), and the stored gradient at step t of a pass is exactly that of the losses of steps
t .. reach - 1 in one undetached pass (the probe's gradients of that window alone, on the same text)."""
import numpy as np
from torch import nn

from conftest import char_model
from rnnscope import probe
from rnnscope.probe import Probe
from rnnscope.store.run import grad_passes

DOCS = {"a": "int main(void) { return 0; }\n" * 2, "b": "if (x) { puts(\"hi\"); }\n"}


def test_passes_follow_chunks_horizon_and_documents():
    bounds = np.array([[0, 10], [10, 13]])
    assert grad_passes(bounds, 4, 2, False).tolist() == [[0, 4, 6], [4, 8, 10], [8, 10, 10], [10, 13, 13]]
    assert grad_passes(bounds, 4, 5, True).tolist() == [[0, 4, 9], [4, 8, 13], [8, 10, 13], [10, 13, 13]]


def test_each_pass_holds_the_gradient_of_its_own_window_of_losses(tmp_path, tiny_vocab):
    ck = char_model("lstm", tiny_vocab)
    run = probe.record(ck, DOCS, tmp_path / "r", grad=True, chunk=13, horizon=5, dtype="float32", progress=False)
    passes = run.grad_passes
    assert passes[:, 0].tolist() == [0, 13, 26, 39, 52, 58, 71] and (passes[1:, 0] == passes[:-1, 1]).all()
    assert passes.tolist()[:2] == [[0, 13, 18], [13, 26, 31]] and passes[4].tolist() == [52, 58, 58]
    checked = 0
    for d, (a, b) in enumerate(run.step_bounds.tolist()):
        ids = tiny_vocab.encode(list(DOCS.values())[d])
        for s, e, reach in passes[(passes[:, 0] >= a) & (passes[:, 0] < b)].tolist():
            with Probe(ck.model, grad=True) as p:            # the whole document, nothing detached
                loss = nn.functional.cross_entropy(ck.model(ids)[0, :-1], ids[0, 1:], reduction="none")
                loss[s - a:reach - a].sum().backward()
            for key in ("rnn.l0.grad_h", "rnn.l1.grad_c"):
                want = p.trace[key][0, s - a:e - a].numpy()
                np.testing.assert_allclose(run[key][s:e], want, rtol=1e-4, atol=1e-6, err_msg=f"{key} {s}..{e}")
            checked += 1
    assert checked == len(passes)
