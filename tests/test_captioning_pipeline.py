"""The captioning decoder of "Show, Attend and Tell" (``steploops.Captioner``: an LSTMCell per word, soft
attention over an image's feature grid) through the whole pipeline: recorded with its attention into a
Run, analysed from the command line, served in a real browser with the attention shown over the grid's
positions, exported as a PNG. Each caption is a document; its image's feature grid a field of it."""
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import rnnscope as rs
from steploops import Captioner

WORDS = "abcdefghi"                    # one "word" per character: ids 1..9, 0 starts a caption
CAPTIONS = ["abcab", "cabbage", "head", "badge"] + ["".join(np.random.default_rng(s).choice(list(WORDS), 6 + s % 7))
                                                   for s in range(12)]
P, E = 4, 6                            # feature grid positions and their width


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[WORDS.index(c) + 1 for c in text]])


def grid(i: int) -> list:
    """Image i's feature grid ``[P, E]``, kept in the document as plain numbers."""
    return np.random.default_rng(i).normal(size=(P, E)).round(4).tolist()


def call(model, ids, document):
    """Teacher forcing: the caption after a start token; one decoder step per word of the caption."""
    caps = torch.cat([torch.zeros(1, 1, dtype=torch.long), ids], 1)
    return model(torch.tensor([document["grid"]], dtype=torch.float32), caps, [caps.shape[1]])


def loss(output, ids):
    return F.cross_entropy(output[0], ids, reduction="none")          # ids [T]: each step predicts its word


def weights(out):
    """The attention module's output ``[b, P, 1]`` (scores) -> its weights over the grid ``[b, P]``."""
    return out.squeeze(2).softmax(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = Captioner(V=len(WORDS) + 1, E=E).eval()
    docs = [{"name": f"image {i}", "text": c, "grid": grid(i)} for i, c in enumerate(CAPTIONS)]
    path = tmp_path_factory.mktemp("captions") / "run"
    rs.record(rs.Subject(model, encode, loss=loss, call=call), docs, path, grad=True,
              attention={"full_att": weights}, dtype="float32", progress=False)
    return rs.open_run(path), model, docs


def test_the_run_holds_each_steps_attention_over_the_grid_as_the_loop_computed_it(run):
    run, model, docs = run
    assert run.manifest["attention"]["full_att"]["over"] == "positions"
    assert {k.rsplit(".", 1)[1] for k in run.keys()} >= {"h", "c", "i", "f", "g", "o", "grad_h", "grad_c"}
    for d, doc in enumerate(docs):
        stored = run.attention("full_att")[d]
        assert stored.shape == (len(doc["text"]), P)
        seen = []                                         # the loop's own weights, unprobed
        hook = model.full_att.register_forward_hook(lambda m, i, out: seen.append(weights(out).detach()))
        with torch.no_grad():
            call(model, encode(doc["text"]), doc)
        hook.remove()
        np.testing.assert_allclose(stored, torch.cat(seen).numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stored.sum(1), 1.0, atol=1e-5)
    assert run.documents["grid"].tolist() == [doc["grid"] for doc in docs]      # the image stays with its caption


def test_analyze_serve_and_export_the_captioner_with_its_attention(run, tmp_path, capsys, request):
    from rnnscope.cli import main
    run, _, _ = run
    assert main(["analyze", str(run.path), "--features", "column,to_line_end", "--no-decay", "--shifts", "2",
                 "--contexts", "2"]) == 0
    assert "top units per feature" in capsys.readouterr().out
    png = tmp_path / "attention.png"
    assert main(["export", str(run.path), "--attention", "full_att", "--document", "1", "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 400 <= struct.unpack(">II", data[16:24])[0] <= 1600
    if not shutil.which("chromedriver"):
        pytest.skip("needs chromium and chromium-driver for the served page")
    driver = request.getfixturevalue("driver")
    from browser import column, get, served, set_prop, wait_for_model, wait_until
    with served(run.path) as (url, _):
        driver.get(url)
        wait_for_model(driver, "views")
        titles = driver.execute_script("return Bokeh.documents[0].get_model_by_name('views').tabs.map(t => t.title)")
        set_prop(driver, "views", "active", titles.index("attention"))
        wait_for_model(driver, "attention_source")
        set_prop(driver, "document", "value", "1")                     # "cabbage": 7 steps over 4 positions
        wait_until(lambda: column(driver, "attention_image", "dh") == [7])
        assert column(driver, "attention_image", "dw") == [P]
        set_prop(driver, "attention_step", "value", 2)
        wait_until(lambda: get(driver, "attention_info", "text").startswith("<p>decoder step <b>2 b<"))
        shown = [float(w) for w in re.findall(r'title="([0-9.]+)"', get(driver, "attention_source", "text"))]
        np.testing.assert_allclose(shown, run.attention("full_att")[1][2], atol=5e-5)   # position by position
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
