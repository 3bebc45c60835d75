"""Attention at every step, all the way to the page: stored in a Run by ``record(..., attention=)`` and
``rnnscope probe --attention``, equal to ``probe.attention`` exactly, checked on open (a hostile Run is
one line), drawn by the dashboard's attention tab in a real browser and by ``rnnscope export --attention``."""
import json
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.errors import RnnscopeError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from attention_loop import ALPHABET, Attention, Reverser, encode, reverse_loss  # noqa: E402

TEXTS = ["recurrent", "attention", "loops"]


class Translator(nn.Module):
    """An encoder-decoder of lengths of its own: a GRU over the source ids, an ``LSTMCell`` called once per
    target id with the README's additive attention over the encoder's states before each call."""

    def __init__(self, V: int = len(ALPHABET) + 1, E: int = 8, H: int = 12):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.encoder = nn.Embedding(V, E), nn.GRU(E, H, batch_first=True, bidirectional=True)
        self.attention, self.cell, self.out = Attention(H), nn.LSTMCell(E + 2 * H, H), nn.Linear(H, V)

    def forward(self, ids, source):
        enc, _ = self.encoder(self.embed(source))
        state, h, logits = None, enc.new_zeros(len(ids), self.cell.hidden_size), []
        for t in range(ids.shape[1]):
            context, _ = self.attention(h, enc)
            state = self.cell(torch.cat([self.embed(ids[:, t]), context], 1), state)
            h = state[0]
            logits.append(self.out(h))
        return torch.stack(logits, 1)


def translate(model, ids, document):
    return model(ids, encode(document["source"]))


PAIRS = [{"name": "first", "source": "abcdef", "target": "xyz"}, {"name": "second", "source": "qrs", "target": "hello"}]


def in_memory(model, *args, grad: bool = False) -> np.ndarray:
    """``probe.attention['attention'][0]`` ``[steps, source]`` of one call of ``model``, in the mode the Run
    was recorded in (with ``grad`` the recurrent layers take the path that keeps their gates for the
    backward, whose products may round in another last bit on two threads)."""
    with torch.set_grad_enabled(grad), rs.Probe(model, attention=["attention"], grad=grad) as p:
        model(*args)
    return p.attention["attention"][0].numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    torch.manual_seed(0)
    reverser = Reverser().eval()
    rs.record(rs.Subject(reverser, encode, loss=reverse_loss), TEXTS, root / "reverse", grad=True,
              attention=["attention"], progress=False)
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n", encoding="utf-8")
    translator = Translator().eval()
    rs.record(rs.Subject(translator, encode, loss=None, call=translate),
              rs.probe.corpus.read_documents(root / "pairs.jsonl"), root / "pairs", attention=["attention"],
              modules=["cell"], progress=False)
    return root, reverser, translator


def test_the_stored_weights_equal_the_probes_exactly_and_are_mapped(runs):
    root, reverser, _ = runs
    run = rs.open_run(root / "reverse")
    assert run.attention_names() == ["attention"]
    entry = run.manifest["attention"]["attention"]
    assert entry == {"file": "attention/attention/weights.npy", "offsets": "attention/attention/offsets.npy",
                     "steps": len(run), "positions": sum(len(t) ** 2 for t in TEXTS), "max_source": 9,
                     "over": "positions"}
    weights = run.attention("attention")
    assert isinstance(weights.flat, np.memmap) and weights.lengths.tolist() == [len(t) for t in TEXTS for _ in t]
    for d, text in enumerate(TEXTS):
        got = weights[d]
        assert got.dtype == np.float32 and np.array_equal(got, in_memory(reverser, encode(text), grad=True))
        assert np.shares_memory(got, weights.flat)          # a view of the mapped file, not a copy
    s = int(run.step_bounds[1, 0]) + 4
    assert np.array_equal(weights.row(s), weights[1][4])
    assert run.source is None and "cell.l0.grad_c" in run.keys()     # the states are recorded as before


def test_a_source_field_gives_each_position_its_text_and_lengths_of_their_own(runs):
    root, _, translator = runs
    run = rs.open_run(root / "pairs")
    assert run.manifest["attention"]["attention"]["over"] == "source" and run.manifest["source"]["chars"] == 9
    assert [run.source.tokens(d) for d in range(2)] == [list("abcdef"), list("qrs")]
    weights = run.attention("attention")
    for d, pair in enumerate(PAIRS):
        got = weights[d]
        assert got.shape == (len(pair["target"]), len(pair["source"]))
        assert np.array_equal(got, in_memory(translator, encode(pair["target"]), encode(pair["source"])))
    assert run.text == "xyzhello"                           # the target is the Run's text, the source beside it


def _copy(root: Path, name: str, tmp_path: Path) -> Path:
    bad = tmp_path / name
    shutil.copytree(root / name, bad)
    return bad


def _manifest(run: Path, change) -> None:
    m = json.loads((run / "manifest.json").read_text())
    change(m)
    (run / "manifest.json").write_text(json.dumps(m))


def _refused(run: Path, match: str) -> None:
    with pytest.raises(RnnscopeError, match=match) as err:
        rs.open_run(run)
    assert "\n" not in str(err.value)


def test_a_hostile_run_is_refused_in_one_line(runs, tmp_path):
    root = runs[0]
    bad = _copy(root, "reverse", tmp_path)                 # a name that is a path
    _manifest(bad, lambda m: m["attention"].update({"../../etc": m["attention"].pop("attention")}))
    _refused(bad, "not a module name")
    bad = _copy(root, "reverse", tmp_path / "shape")       # weights of another length than the manifest's
    flat = np.load(bad / "attention/attention/weights.npy")
    np.save(bad / "attention/attention/weights.npy", flat[:-1])
    _refused(bad, "has shape")
    bad = _copy(root, "reverse", tmp_path / "rows")        # the right shape, but a row that is not weights
    flat[3] += 0.5
    np.save(bad / "attention/attention/weights.npy", flat)
    _refused(bad, "at step 0 a row that is not attention weights")
    bad = _copy(root, "reverse", tmp_path / "negative")    # summing to 1, but through a negative weight
    flat[3] -= 0.5
    flat[2], flat[4] = -flat[2], flat[4] + 2 * flat[2]
    np.save(bad / "attention/attention/weights.npy", flat)
    _refused(bad, "at step 0 a row that is not attention weights")
    bad = _copy(root, "reverse", tmp_path / "offsets")     # offsets that do not tile the rows
    offsets = np.load(bad / "attention/attention/offsets.npy")
    offsets[2] = offsets[1]
    np.save(bad / "attention/attention/offsets.npy", offsets)
    _refused(bad, "does not give each step a row")
    bad = _copy(root, "reverse", tmp_path / "file")        # an entry pointing at another file
    _manifest(bad, lambda m: m["attention"]["attention"].update(file="states/cell.l0.h.npy"))
    _refused(bad, "malformed attention entry")
    bad = _copy(root, "pairs", tmp_path / "source")        # rows of another length than their source's
    _manifest(bad, lambda m: m["attention"]["attention"].update(over="positions") or m.pop("source"))
    rs.open_run(bad)                                       # without a source the positions are indexes
    bad = _copy(root, "pairs", tmp_path / "source2")
    bounds = np.load(bad / "source/bounds.npy")
    bounds[1] = [5, 5]                                     # the first source 5 positions (it has 6), the second 4
    np.save(bad / "source/bounds.npy", bounds)
    _refused(bad, "gives step 0 6 source positions but its document's source has 5")


def test_record_refuses_what_it_cannot_store(tmp_path):
    model = Reverser().eval()
    subject = rs.Subject(model, encode, loss=None)
    with pytest.raises(RnnscopeError, match="'decoder.attn' is not a submodule of Reverser"):
        rs.record(subject, TEXTS, tmp_path / "a", attention=["decoder.attn"], progress=False)
    with pytest.raises(RnnscopeError, match="whole document per call.*--chunk 9"):
        rs.record(subject, TEXTS, tmp_path / "b", attention=["attention"], chunk=4, progress=False)
    with pytest.raises(RnnscopeError, match="holds no weights"):
        rs.record(subject, TEXTS, tmp_path / "c", attention=["cell"], progress=False)
    with pytest.raises(RnnscopeError, match="weighs 6 source positions in document 'first'"):
        rs.record(rs.Subject(Translator(), encode, loss=None, call=lambda m, ids, document: m(ids, encode("abcdef"))),
                  [{"text": "xyz", "source": "abc", "name": "first"}], tmp_path / "e", attention=["attention"],
                  modules=["cell"], progress=False)
    assert not any(tmp_path.iterdir())                     # nothing half-written


def test_probe_and_export_from_the_command_line(tmp_path, capsys):
    from rnnscope.cli import main
    (tmp_path / "model.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nimport torch\nimport rnnscope as rs\n"
        "from attention_loop import Reverser, encode, reverse_loss\n"
        "def build():\n    torch.manual_seed(0)\n    return rs.Subject(Reverser().eval(), encode, loss=reverse_loss)\n"
        % str(ROOT / "examples"))
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    assert main(["probe", "--model", f"{tmp_path}/model.py:build", "--text", str(tmp_path / "texts.jsonl"),
                 "--attention", "attention", "--out", str(tmp_path / "run")]) == 0
    assert "attention of attention at every step" in capsys.readouterr().out
    run = rs.open_run(tmp_path / "run")
    assert run.attention("attention")[2].shape == (5, 5)
    assert main(["export", str(tmp_path / "run"), "--attention", "attention", "--document", "1",
                 "--out", str(tmp_path / "a.html")]) == 0
    page = (tmp_path / "a.html").read_text()
    assert "attention of attention, document texts.jsonl#1: 9 steps x 9 source positions" in page
    assert main(["export", str(tmp_path / "run"), "--attention", "nope", "--out", str(tmp_path / "b.html")]) == 2
    assert not (tmp_path / "b.html").exists()


def test_the_source_is_shaded_as_escaped_text_darkest_where_the_step_looks_most():
    from rnnscope.dashboards.attention import source_html
    html = source_html(["<img src=x onerror=alert(1)>", "b", "$$x$$"], np.array([0.2, 0.5, 0.3], np.float32))
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    shades = [float(a) for a in re.findall(r"rgba\(8, 69, 148, ([0-9.]+)\)", html)]
    assert shades == [0.4, 1.0, 0.6] and 'title="0.5000"' in html


def test_the_tab_follows_the_document_draws_at_most_its_limit_and_a_click_picks_a_step(runs, monkeypatch):
    from types import SimpleNamespace
    from bokeh.document import Document
    from rnnscope.dashboards import attention as view
    from rnnscope.dashboards.app import RunData, build
    monkeypatch.setattr(view, "VIEW_STEPS", 4)
    page = build(Document(), RunData(runs[0] / "pairs"), defer=False)
    tab = next(v for v in page.tabs.built if isinstance(v, view.AttentionView))
    assert tab.weights.shape == (3, 6) and tab.step.high == 2 and "first 4" not in tab.info.text
    page.sel.set(document=1)                                # "hello" over "qrs": 5 steps, 4 drawn
    assert tab.weights.shape == (4, 3) and tab.step.high == 3 and "the first 4 of the document's 5 steps" in tab.info.text
    tab._tap(SimpleNamespace(y=3.5))                        # the top row is step 0
    assert tab.step.value == 0 and tab.marker.data["bottom"] == [3]
    tab._tap(SimpleNamespace(y=0.2))
    assert tab.step.value == 3 and tab.info.text.startswith("<p>decoder step <b>3 l<")


needs_browser = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")


@needs_browser
def test_export_writes_a_png_of_a_sane_size(runs, tmp_path):
    from rnnscope.dashboards.export import export_run
    out = export_run(runs[0] / "pairs", tmp_path / "a.png", attention="attention", document="second")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    width, height = struct.unpack(">II", data[16:24])
    assert 400 <= width <= 1600 and 200 <= height <= 1000


@needs_browser
def test_choosing_a_decoder_step_shades_the_source_by_its_weights_in_the_browser(runs, driver):
    from browser import column, get, served, set_prop, wait_for_model, wait_until
    root, _, translator = runs
    want = in_memory(translator, encode("hello"), encode("qrs"))      # document "second": 5 steps x 3 positions
    with served(root / "pairs") as (url, _):
        driver.get(url)
        wait_for_model(driver, "views")
        titles = driver.execute_script("return Bokeh.documents[0].get_model_by_name('views').tabs.map(t => t.title)")
        set_prop(driver, "views", "active", titles.index("attention"))
        wait_for_model(driver, "attention_source")
        set_prop(driver, "document", "value", "1")
        wait_until(lambda: ">q</span>" in get(driver, "attention_source", "text"))      # the document followed
        for step in (0, 3):
            set_prop(driver, "attention_step", "value", step)
            wait_until(lambda: get(driver, "attention_info", "text").startswith(f"<p>decoder step <b>{step} {'hello'[step]}<"))
            html = wait_until(lambda: get(driver, "attention_source", "text"))     # the Div the page drew
            shown = re.findall(r'<span class="attn" title="([0-9.]+)" style="background: rgba\(8, 69, 148, '
                               r'([0-9.]+)\);[^"]*">([^<]*)</span>', html)
            assert [t for _, _, t in shown] == list("qrs")
            assert np.allclose([float(w) for w, _, _ in shown], want[step], atol=5e-5)
            alpha = [float(a) for _, a, _ in shown]                     # the darkest where the step looks most
            assert int(np.argmax(alpha)) == int(np.argmax(want[step])) and max(alpha) == 1.0
        assert column(driver, "attention_image", "dw") == [3] and column(driver, "attention_image", "dh") == [5]
        assert column(driver, "attention_marker", "bottom") == [1]       # step 3 of 5, the first on top
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
