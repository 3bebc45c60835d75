"""Runs whose steps are input frames, not text (audio, sensor readings): recorded from arrays
``[T, features]`` with time stamps, every recorded value equal to the model's own, the time stamps
stored and checked on open, every step scored by ``find_neurons`` against a per-step feature."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.errors import RnnscopeError

FEATURES = 3


class CellLoop(nn.Module):
    """An audio-style model: one ``nn.LSTMCell`` called once per frame of ``x [1, T, features]``."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(FEATURES, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = c = x.new_zeros(1, self.cell.hidden_size)
        out = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            out.append(h)
        return self.head(torch.stack(out, 1))


class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(FEATURES, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def planted() -> CellLoop:
    """Unit 0's cell follows frame feature 0: its input gate and output gate open, its forget gate shut,
    its candidate tanh(4 x0); the other units are random."""
    torch.manual_seed(0)
    m = CellLoop()
    H = m.cell.hidden_size
    with torch.no_grad():           # gate order i, f, g, o
        for gate, bias in ((0, 6.0), (1, -6.0), (3, 6.0)):
            m.cell.weight_ih[gate * H] = 0
            m.cell.weight_hh[gate * H] = 0
            m.cell.bias_ih[gate * H], m.cell.bias_hh[gate * H] = bias, 0
        m.cell.weight_ih[2 * H] = torch.tensor([4.0, 0, 0])
        m.cell.weight_hh[2 * H] = 0
        m.cell.bias_ih[2 * H] = m.cell.bias_hh[2 * H] = 0
    return m


def corpus(seed=0, docs=4):
    """Documents of random frames, a 'speech' on/off signal in blocks, feature 0 following it in noise."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(docs):
        T = int(rng.integers(60, 90))
        speech = np.repeat(rng.integers(0, 2, T // 6 + 1), 6)[:T].astype(float)
        x = rng.normal(size=(T, FEATURES)).astype(np.float32)
        x[:, 0] = (2 * speech - 1) + 0.4 * x[:, 0]
        out.append({"name": f"clip{d}", "input": x, "times": np.cumsum(rng.uniform(0.01, 0.03, T)),
                    "speaker": f"s{d % 2}", "speech": speech})
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    model, docs = planted(), corpus()
    run = rs.record(model, [{k: v for k, v in d.items() if k != "speech"} for d in docs], root / "run",
                    dtype="float32", progress=False)
    return root, model, docs, run


def test_recorded_states_are_the_cells_own_outputs(recorded):
    root, model, docs, run = recorded
    assert run.frames and run.text == "" and run.ids is None and (run.spans == -1).all()
    assert "frames (no text)" in repr(run)
    assert sorted(run.keys()) == ["cell.l0.c", "cell.l0.f", "cell.l0.g", "cell.l0.h", "cell.l0.i", "cell.l0.o"]
    assert run.documents["name"].tolist() == [d["name"] for d in docs]
    assert run.documents["speaker"].tolist() == ["s0", "s1", "s0", "s1"]
    at = 0
    for d in docs:
        h = c = torch.zeros(1, 6)
        hs, cs = [], []
        with torch.no_grad():
            for x in torch.from_numpy(d["input"]):
                h, c = model.cell(x[None], (h, c))
                hs.append(h[0].numpy())
                cs.append(c[0].numpy())
        T = len(d["input"])
        assert np.array_equal(run["cell.l0.h"][at:at + T], np.stack(hs))       # bit for bit
        assert np.array_equal(run["cell.l0.c"][at:at + T], np.stack(cs))
        at += T
    assert at == len(run)


def test_times_round_trip(recorded):
    root, _, docs, run = recorded
    again = rs.open_run(root / "run")
    assert again.times.dtype == np.float64
    assert np.array_equal(again.times, np.concatenate([d["times"] for d in docs]))
    # without times each document's steps are stamped with their index
    plain = rs.record(planted(), {"a": docs[0]["input"], "b": docs[1]["input"]}, root / "plain", progress=False)
    assert np.array_equal(plain.times, np.concatenate([np.arange(len(docs[0]["input"])),
                                                       np.arange(len(docs[1]["input"]))]))


def test_a_fused_gru_streamed_in_chunks_equals_its_own_output(tmp_path):
    torch.manual_seed(1)
    model, docs = Fused(), corpus(seed=1, docs=2)
    run = rs.record(model, [d["input"] for d in docs], tmp_path / "run", dtype="float32", chunk=16, progress=False)
    at = 0
    for d in docs:
        with torch.no_grad():
            want = model.gru(torch.from_numpy(d["input"])[None])[0][0].double().numpy()
        got = np.asarray(run["gru.l0.h"][at:at + len(want)], np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        at += len(want)


def test_gradients_over_frames_with_a_per_step_loss_equal_a_float64_unrolled_loop(tmp_path):
    torch.manual_seed(2)
    model, docs = Fused(), corpus(seed=2, docs=2)

    def loss(out, x):           # predict feature 1 of each frame: [T]
        return (out[0, :, 0] - x[:, 1]) ** 2
    run = rs.record(rs.Subject(model, loss=loss), [d["input"] for d in docs], tmp_path / "run", grad=True,
                    dtype="float32", progress=False)
    assert run.manifest["loss"]["kind"] == "user"
    cell, head = nn.GRUCell(FEATURES, 5).double(), nn.Linear(5, 2).double()
    with torch.no_grad():
        for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, a).copy_(getattr(model.gru, a + "_l0"))
    head.load_state_dict(model.head.state_dict())
    at = 0
    for d in docs:
        x, h, hs = torch.from_numpy(d["input"]).double(), torch.zeros(1, 5, dtype=torch.float64), []
        for t in range(len(x)):
            h = cell(x[None, t], h)
            h.retain_grad()
            hs.append(h)
        sum((head(h)[0, 0] - x[t, 1]) ** 2 for t, h in enumerate(hs)).backward()
        want = torch.stack([h.grad[0] for h in hs]).numpy()
        got = np.asarray(run["gru.l0.grad_h"][at:at + len(x)], np.float64)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        at += len(x)


class Drops(nn.Module):
    """Skips the last frame: its steps would not line up with the frames."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, 4, batch_first=True)

    def forward(self, x):
        return self.gru(x[:, :-1])[0]


@pytest.mark.parametrize("docs, message", [
    ([np.zeros((5, 3)), np.zeros((5, 2))], "has 2 features"),
    ([np.zeros(5)], "shape [5]"),
    ([{"input": np.zeros((4, 3)), "times": [0, 1, 0.5, 2]}], "before the one before"),
    ([{"input": np.zeros((4, 3)), "times": [0, 1, np.nan, 2]}], "not finite"),
    ([{"input": np.zeros((4, 3)), "times": [0, 1]}], "times of"),
])
def test_bad_frames_are_refused_in_one_line(tmp_path, docs, message):
    with pytest.raises(RnnscopeError, match="^.*" + message.replace("[", r"\[").replace("]", r"\]")) as err:
        rs.record(Fused(), docs, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_a_call_gets_the_frames_batch_1_and_its_document(tmp_path):
    seen = []

    def call(model, x, document):
        seen.append((tuple(x.shape), x.dtype, document["name"], len(document["times"]), document.get("speaker")))
        return model(x)
    docs = corpus(seed=3, docs=2)
    rs.record(rs.Subject(Fused(), call=call), [{k: v for k, v in d.items() if k != "speech"} for d in docs],
              tmp_path / "run", progress=False)
    T = len(docs[1]["input"])
    assert ((1, T, FEATURES), torch.float32, "clip1", T, "s1") in seen


def test_frames_with_attention_are_refused_in_one_line(tmp_path):
    with pytest.raises(RnnscopeError, match="frames are recorded without attention"):
        rs.record(Fused(), [np.zeros((4, 3), np.float32)], tmp_path / "run", attention=["gru"], progress=False)
    assert not (tmp_path / "run").exists()


def test_a_model_that_skips_a_frame_is_refused(tmp_path):
    with pytest.raises(RnnscopeError, match="module .gru. ran 1 steps where the encoder gave 2"):
        rs.record(Drops(), [np.zeros((10, 3), np.float32)], tmp_path / "run", progress=False)


def _tamper(root, name, how):
    bad = root / name
    shutil.copytree(root / "run", bad)
    how(bad)
    return bad


def _times(values):
    return lambda p: np.save(p / "times.npy", values, allow_pickle=False)


def _manifest(**change):
    def edit(p):
        m = json.loads((p / "manifest.json").read_text())
        for k, v in change.items():
            m[k] = v(m) if callable(v) else v
        (p / "manifest.json").write_text(json.dumps(m))
    return edit


def _spans(p):
    s = np.load(p / "spans.npy")
    s[3] = (0, 1)
    np.save(p / "spans.npy", s)


@pytest.mark.parametrize("name, how, message", [
    ("back", lambda p: _times(np.sort(np.load(p / "times.npy"))[::-1].copy())(p), "must not decrease"),
    ("nan", lambda p: _times(np.where(np.arange(len(np.load(p / "times.npy"))) == 7, np.nan,
                                      np.load(p / "times.npy")))(p), "must be finite"),
    ("short", lambda p: _times(np.load(p / "times.npy")[:-1].copy())(p), "has shape"),
    ("f32", lambda p: _times(np.load(p / "times.npy").astype(np.float32))(p), "holds float32"),
    ("gone", lambda p: (p / "times.npy").unlink(), "times.npy"),
    ("spans", _spans, "span"),
    ("ids", _manifest(ids=True), "frames Run with text or ids"),
    ("chars", _manifest(text=lambda m: {**m["text"], "chars": 1}), "frames Run with text"),
    ("sharded", _manifest(format_version=3), "lacks shards"),
])
def test_hostile_frames_runs_are_refused_on_open(recorded, name, how, message):
    root = recorded[0]
    bad = _tamper(root, name, how)
    with pytest.raises(RnnscopeError, match=message) as err:
        rs.open_run(bad)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore::rnnscope.analysis.neurons.CoarseNull")
def test_find_neurons_scores_every_frame_and_finds_the_planted_unit(recorded):
    _, _, docs, run = recorded
    speech = np.concatenate([d["speech"] for d in docs])
    table = rs.find_neurons(run, features={"speech": speech}, progress=False)
    assert table.attrs["scored_steps"] == len(run)          # no step left out for having no text
    best = table[table["selected"]].iloc[0]
    assert best["unit"] in ("cell.l0.h:0", "cell.l0.c:0", "cell.l0.g:0")
    assert best["heldout_score"] > 0.97
    # no characters, so no character control: NaN, never a constant predictor scored as a control
    assert table["control_score"].isna().all() and table["selectivity"].isna().all()
    # a continuous feature: the unit's own drive, r near 1 held out
    drive = np.tanh(4 * np.concatenate([d["input"][:, 0] for d in docs]))
    r = rs.find_neurons(run, features={"drive": drive}, progress=False)
    top = r[r["selected"]].iloc[0]
    assert top["metric"] == "pearson" and top["unit"].endswith(":0") and top["heldout_score"] > 0.95


@pytest.mark.parametrize("features", [None, ["in_comment"], {"f": lambda text: np.zeros(len(text))},
                                      {"f": rs.on_tokens(lambda ts: [0] * len(ts))} if hasattr(rs, "on_tokens")
                                      else None])
def test_text_features_are_refused_for_frames(recorded, features):
    with pytest.raises(RnnscopeError, match="computed on text, and this Run's steps are frames"):
        rs.find_neurons(recorded[3], features=features, progress=False)


needs_chromium = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")


@needs_chromium
def test_export_draws_the_unit_against_time_over_its_key(recorded, tmp_path):
    from PIL import Image

    from test_cli import rnnscope
    root, _, docs, run = recorded
    out = tmp_path / "unit.png"
    rnnscope("export", root / "run", "--unit", "cell.l0.h:0", "--document", "1", "--out", out)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert 1000 <= img.shape[1] <= 2000 and 300 <= img.shape[0] <= 1200        # a line plot above a heatmap
    assert (np.abs(img - 255).sum(2) > 60).mean() > 0.03                          # drawn on, not blank
    html = tmp_path / "unit.html"
    rnnscope("export", root / "run", "--unit", "cell.l0.c:2", "--out", html)
    page = html.read_text()
    assert "unit_line" in page and "heatmap" in page
    # the figure's own data: the unit's values against the document's time stamps
    from rnnscope.dashboards.export import unit_figure
    fig = unit_figure(run, "cell.l0.h:0", document=1)
    line = fig.children[0].renderers[0].data_source.data
    T = len(docs[1]["input"])
    assert np.array_equal(line["time"], docs[1]["times"]) and len(line["value"]) == T
    assert np.array_equal(line["value"], np.asarray(run["cell.l0.h"][len(docs[0]["input"]):][:T, 0], np.float64))


@needs_chromium
def test_dashboard_shows_a_line_over_time_in_place_of_the_text(recorded, driver):
    from browser import column, served, set_prop, wait_for_model, wait_until
    root, _, docs, run = recorded
    T = len(docs[0]["input"])
    with served(root / "run") as (url, _):
        driver.get("about:blank")
        driver.get(url)
        wait_for_model(driver, "line_source")
        assert driver.execute_script("return Bokeh.documents[0].get_model_by_name('text_source') == null")
        times = column(driver, "line_source", "time")
        np.testing.assert_array_equal(times, docs[0]["times"])
        index = driver.execute_script("return Bokeh.documents[0].get_model_by_name('unit_index').value")
        key = driver.execute_script("return Bokeh.documents[0].get_model_by_name('unit_key').value")
        values = column(driver, "line_source", "value")
        np.testing.assert_array_equal(values, np.asarray(run[key][:T, index], np.float64))
        set_prop(driver, "unit_index", "value", (index + 1) % 6)
        want = np.asarray(run[key][:T, (index + 1) % 6], np.float64)
        wait_until(lambda: np.array_equal(column(driver, "line_source", "value"), want))
        wait_for_model(driver, "heatmap")               # the units x steps tab, built after the first paint
        title = lambda: driver.execute_script("return Bokeh.documents[0].get_model_by_name('heatmap').title.text.text")
        assert wait_until(lambda: title().startswith(f"6 units of {key}, steps 0-{T:,}"))
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
