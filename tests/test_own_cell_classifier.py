"""The issue's fourth model kind: the packed LSTM classifier of tests/test_own_model.py written with a
cell (a Python loop over ``nn.LSTMCell``, each review read to its own length, a label loss per
document), trained here for a second, recorded from the command line with gradients, analysed,
served and exported, with nothing silently wrong: the Run's h and c equal the cell's own outputs bit
for bit, its gates and gradients a float64 textbook loop's (tests/steploops.py), its loss each
document's own."""
import importlib.util
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rnnscope.store import open_run
from steploops import reference
from test_own_model import V, analyzed, char_ids, labelled, page  # noqa: F401 (page: a fixture)

MODEL = f'''
import torch
from pathlib import Path
from torch import nn
from torch.nn import functional as F
from rnnscope.probe import Subject

class CellClassifier(nn.Module):
    """An LSTM classifier as a step loop: one nn.LSTMCell call per id, the label read off the last h."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.emb, self.cell, self.head = nn.Embedding({V}, 8), nn.LSTMCell(8, 12), nn.Linear(12, 2)

    def forward(self, ids, lengths=None):
        x, state = self.emb(ids), None
        for t in range(ids.shape[1]):
            new = self.cell(x[:, t], state)
            if lengths is not None and state is not None:       # a padded batch: a review ends at its length
                keep = (t < lengths)[:, None]
                new = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
            state = new
        return self.head(state[0])

def encode(text):
    return torch.tensor([ord(c) % {V - 1} + 1 for c in text])

def loss(output, ids, document):
    return F.cross_entropy(output.float(), torch.tensor([document["label"]]))

def build():
    model = CellClassifier()
    model.load_state_dict(torch.load(Path(__file__).with_name("weights.pt"), weights_only=True))
    return Subject(model, encode, loss=loss)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(folder, model, rows, corpus)``: the spec file, its model trained on 40 labelled reviews (a padded batch
    read to each review's length), its weights beside it, and the reviews as a .jsonl."""
    root = tmp_path_factory.mktemp("cell")
    (root / "cellclf.py").write_text(MODEL)
    spec = importlib.util.spec_from_file_location("cellclf", root / "cellclf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path, rows = labelled(root, 40)
    model = module.CellClassifier()
    ids = torch.nn.utils.rnn.pad_sequence([char_ids(r["text"]) for r in rows], batch_first=True)
    lengths, labels = torch.tensor([len(r["text"]) for r in rows]), torch.tensor([r["label"] for r in rows])
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    first = None
    for _ in range(15):
        loss = F.cross_entropy(model(ids, lengths), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first                  # it learned something: the gradients are not a random net's
    torch.save(model.state_dict(), root / "weights.pt")
    return root, model.eval(), rows, path


def test_a_cell_loop_classifier_goes_through_probe_analyze_serve_and_export(trained, capsys, page):
    from rnnscope.cli import main
    root, model, rows, corpus = trained
    run_path = root / "run"
    assert main(["probe", "--model", f"{root / 'cellclf.py'}:build", "--text", str(corpus), "--out", str(run_path),
                 "--grad", "--dtype", "float32"]) == 0
    assert "nats/document" in capsys.readouterr().out
    run = open_run(run_path)
    kinds = {k.split(".", 2)[2] for k in run.keys()}
    assert {k.rsplit(".", 1)[0] for k in run.keys()} == {"cell.l0"} and kinds == set("hcifgo") | {"grad_h", "grad_c"}
    assert run.manifest["documents"] == 40 and run.manifest["loss"]["per"] == "document"
    assert run["cell.l0.grad_h"].dtype == np.float32
    losses, (m64, refs) = [], reference(model)                  # the textbook loop in float64, and autograd
    for d, r in enumerate(rows):
        a, b = run.documents.step_start[d], run.documents.step_end[d]
        ids = char_ids(r["text"])[None]
        outputs = []                                            # the cell's own outputs, unprobed
        hook = model.cell.register_forward_hook(lambda m, i, out: outputs.append(out))
        with torch.no_grad():
            losses.append(float(F.cross_entropy(model(ids), torch.tensor([r["label"]]))))
        hook.remove()
        np.testing.assert_array_equal(run["cell.l0.h"][a:b], torch.cat([h for h, _ in outputs]).numpy())
        np.testing.assert_array_equal(run["cell.l0.c"][a:b], torch.cat([c for _, c in outputs]).numpy())
        # the loss's own gradient at the logits is float32's softmax - label, which loses digits as the
        # softmax nears 1 (a trained classifier's): taken as given, everything behind it is float64
        logits = model(ids).detach().requires_grad_()
        upstream, = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([r["label"]])), logits)
        refs["cell"].steps.clear()
        (m64(ids) * upstream.double()).sum().backward()
        steps = refs["cell"].steps
        for kind in "ifgo":
            want = torch.cat([s[kind] for s in steps]).detach().numpy()
            np.testing.assert_allclose(run[f"cell.l0.{kind}"][a:b], want, rtol=1e-5, atol=1e-6)
        for kind in "hc":
            want = torch.cat([s[f"delta_{kind}"].grad for s in steps]).numpy()
            got = np.asarray(run[f"cell.l0.grad_{kind}"][a:b], np.float64)
            # stored in float32, no gradient becomes zero but where float32 arithmetic makes it one (a
            # saturated tanh's 1 - tanh^2, ~1e-13 in float64 against ~1e-4 in the same document)
            assert ((got != 0) | (np.abs(want) < 1e-7 * np.abs(want).max())).all()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(run.document_loss, losses, rtol=1e-5)
    analyzed(run_path, capsys, page)
    assert main(["analyze", str(run_path), "--unit", "cell.l0.c:0", "--contexts", "3"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(printed) == 6
    for line in printed:                        # each window's document, counted from 0 as --document N
        step, d = re.search(r"step +([\d,]+)  doc (\d+): review \2  ", line).groups()
        assert run.step_document[int(step.replace(",", ""))] == int(d)
    from bokeh.document import Document
    from rnnscope.dashboards.app import build
    from rnnscope.dashboards.server import check_run
    data = check_run(run_path, 100)                                     # the page `serve` builds at start
    page = Document()
    build(page, data, defer=False)
    rows = page.select_one({"name": "context_rows"}).data               # each window's document, from 0
    assert rows["document"] == [f"{d}: review {d}" for d in run.step_document[[int(t) for t in rows["step"]]]]
    out = root / "review3.html"
    assert main(["export", str(run_path), "--unit", "cell.l0.c:0", "--document", "3", "--out", str(out)]) == 0
    assert main(["export", str(run_path), "--unit", "cell.l0.c:0", "--document", "review 3", "--out",
                 str(root / "by_name.html"), "--overwrite"]) == 0
    assert out.stat().st_size > 10_000 and "review 3" in capsys.readouterr().out + out.read_text()
