"""The live training page over a watch log (issue 14, "Seen live"): rows computed from the log's
tables, streamed into the page as blocks appear, in a real browser against a log that grows during
the test; the PNG export; the refusals."""
import os
import shutil
import time
import warnings
from io import BytesIO

import numpy as np
import pandas as pd
import pytest
from bokeh.document import Document
from bokeh.models import Div
from PIL import Image

from browser import column, served, set_prop, wait_for_model, wait_until
from test_cli import one_line_error, rnnscope

from rnnscope.dashboards import watch_data as wd
from rnnscope.dashboards.watch_app import make_watch_document
from rnnscope.store.watchlog import SCHEMAS, WatchLogWriter, open_watch_log

needs_browser = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver "
                                   "(apt-get install chromium chromium-driver; .ci/run installs them)")
HOSTILE = "$$\\href{javascript:window.__pwned=1}{x}$$<img src=x onerror=\"window.__pwned=2\">"
MODEL = {"class": HOSTILE, "checksum": "0", "modules": {
    "rnn": {"type": "LSTM", "layers": 2, "hidden": 16, "bidirectional": False},
    "gru": {"type": "GRU", "layers": 1, "hidden": 8, "bidirectional": False}}}
KEYS = ["rnn.l0.grad_h", "rnn.l0.grad_c", "rnn.l1.grad_h", "rnn.l1.grad_c", "gru.l0.grad_h"]
EVERY, T = 10, 12


def block(first: int, n: int, *, clipped=(), nonfinite=(), rate: float = 0.8) -> dict[str, pd.DataFrame]:
    """``n`` watched steps from ``first``, with known values: the loss ``3 - step/1000``, the decay
    ``rate ** lag`` scaled by the step (so each step's column differs), half-life ``step / 10``."""
    steps = [first + EVERY * i for i in range(n)]
    loss = [np.nan if s in nonfinite else 3 - s / 1000 for s in steps]
    st = pd.DataFrame({"step": steps, "wall": [s / 10 for s in steps], "loss": loss,
                       "loss_finite": [s not in nonfinite for s in steps], "grad_norm": [1.0 + s for s in steps],
                       "grad_norm_after": [min(1.0 + s, 5.0) for s in steps], "clipped": [s in clipped for s in steps],
                       "clips": [int(s in clipped) for s in steps],
                       "flags": ["nonfinite_loss" if s in nonfinite else "" for s in steps]})
    decay = pd.DataFrame([{"step": s, "key": k, "lag": lag, "norm": (rate * (1 + s / 1000)) ** lag}
                          for s in steps for k in KEYS for lag in range(T)])
    layers = pd.DataFrame([{"step": s, "key": k, "half_life": s / 10, "param_grad_norm": 0.5,
                            "sat_i": 0.1, "sat_f": 0.2, "sat_o": 0.3, "sat_r": np.nan, "sat_z": np.nan,
                            "sat_h": np.nan} for s in steps for k in ("rnn.l0", "rnn.l1", "gru.l0")])
    timesteps = SCHEMAS["timesteps"].empty_table().to_pandas()       # the page does not read it
    return {"steps": st, "timesteps": timesteps, "decay": decay, "layers": layers}


@pytest.fixture
def log(tmp_path):
    """A watch log with three watched steps (0, 10, 20) and a writer still holding it, as a training
    loop would while the page is open."""
    w = WatchLogWriter(tmp_path / "train", EVERY, MODEL, KEYS)
    w.append(block(0, 3, clipped={10}))
    yield w
    w.close()


def test_rows_from_tables_mark_clipping_flags_and_missing_gates():
    b = block(0, 5, clipped={10, 30}, nonfinite={20})
    rows = wd.loss_rows(b["steps"])
    assert np.isnan(rows["loss"][2]) and rows["loss"][3] == 3 - 30 / 1000
    assert list(wd.clip_rows(b["steps"])["step"]) == [10, 30]
    flags, last = wd.flag_rows(b["steps"], last_loss=9.0)
    assert list(flags["step"]) == [20] and flags["flags"] == ["nonfinite_loss"]
    assert flags["y"][0] == 3 - 10 / 1000                  # at the last finite loss before it
    assert last == 3 - 40 / 1000
    layer = wd.layer_rows(b["layers"], "rnn.l1")
    assert list(layer["half_life"]) == [0, 1, 2, 3, 4] and np.isnan(layer["sat_r"]).all()
    assert wd.family({"model": MODEL}, "gru.l0") == "gru" and wd.family({"model": MODEL}, "rnn.l1") == "lstm"
    assert wd.layer_keys({"keys": KEYS}) == ["rnn.l0", "rnn.l1", "gru.l0"]
    decay = b["decay"].copy()
    decay.loc[(decay.step == 40) & (decay.lag == 3), "norm"] = 0.0         # no place on a log scale
    images = wd.decay_images(decay, "rnn.l1.grad_c", EVERY)
    assert images["step"] == [0, 10, 20, 30, 40] and images["x"][1] == 5 and images["dh"][0] == T
    np.testing.assert_allclose(images["image"][2][:, 0], (0.8 * 1.02) ** np.arange(T))
    assert np.isnan(images["image"][4][3, 0])
    low, high = wd.norm_range(images["image"])
    assert low == pytest.approx((0.8 * 1.0) ** (T - 1)) and high == 1.0
    empty = wd.loss_rows(b["steps"].iloc[:0])                # the same columns with no rows: stream needs them
    assert set(empty) == set(rows) and all(len(v) == 0 for v in empty.values())


def test_a_new_block_is_streamed_into_every_view_never_replaced(log):
    doc = Document()
    page = make_watch_document(doc, log.path)
    v = page.views
    assert list(v.loss.data["step"]) == [0, 10, 20] and len(v.decay.data["image"]) == 3
    events = []
    doc.on_change(lambda e: events.append(e))
    page.tick()                                                # nothing new: nothing sent
    assert not [e for e in events if type(e).__name__.startswith("Column")]
    log.append(block(30, 2, clipped={40}, rate=1.5))           # a growing gradient: the colour range widens
    page.tick()
    assert list(v.loss.data["step"]) == [0, 10, 20, 30, 40]
    assert list(v.clips.data["step"]) == [10, 40]
    assert list(v.layers["rnn.l1"].data["half_life"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(v.decay.data["image"][4][:, 0], (1.5 * 1.04) ** np.arange(T))
    assert v.mapper.high == pytest.approx((1.5 * 1.04) ** (T - 1))
    kinds = {type(e).__name__ for e in events}
    assert "ColumnsStreamedEvent" in kinds and "ColumnDataChangedEvent" not in kinds
    streamed = {e.model.name for e in events if type(e).__name__ == "ColumnsStreamedEvent"}
    assert {"watch_loss", "watch_clips", "watch_decay", "watch_layer_0", "watch_layer_2"} <= streamed
    assert "5 watched steps, the last at training step 40" in page.status.text
    page.key.value = "gru.l0.grad_h"                           # another key: its whole heatmap
    assert len(v.decay.data["image"]) == 5


def test_header_escapes_the_model_name_and_never_typesets_it(log):
    doc = Document()
    page = make_watch_document(doc, log.path)
    header = page.root.children[0]
    assert header.disable_math and "&lt;img" in header.text and "<img" not in header.text
    assert all(d.disable_math for d in doc.select({"type": Div}))


@needs_browser
def test_page_grows_in_the_browser_while_the_log_grows(log, driver):
    with served(log.path) as (url, _):
        driver.get("about:blank")
        driver.get_log("browser")
        driver.get(url)
        wait_for_model(driver, "watch_loss")
        assert column(driver, "watch_loss", "step") == [0, 10, 20]
        assert len(column(driver, "watch_decay", "step")) == 3
        for first in (30, 50):                                 # two blocks while the page is open
            log.append(block(first, 2, clipped={first}))
            wait_until(lambda: len(column(driver, "watch_loss", "step")) == first // EVERY + 2, timeout=15)
        assert column(driver, "watch_loss", "step") == [0, 10, 20, 30, 40, 50, 60]
        assert column(driver, "watch_clips", "step") == [10, 30, 50]
        assert column(driver, "watch_decay", "step") == [0, 10, 20, 30, 40, 50, 60]
        assert column(driver, "watch_layer_1", "half_life") == [0, 1, 2, 3, 4, 5, 6]
        set_prop(driver, "decay_key", "value", "gru.l0.grad_h")         # a key chosen in the page
        time.sleep(1.5)
        assert column(driver, "watch_decay", "step") == [0, 10, 20, 30, 40, 50, 60]
        status = driver.execute_script("return Bokeh.documents[0].get_model_by_name('watch_status').text")
        assert "7 watched steps" in status
        assert driver.execute_script("return window.__pwned === undefined")
        assert not driver.execute_script("return document.querySelector('mjx-container, .MathJax') !== null")
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@needs_browser
def test_export_draws_the_log_to_png(log, tmp_path):
    from rnnscope.dashboards.watch_export import export_watch
    log.append(block(30, 4, clipped={40}, nonfinite={50}))
    out = export_watch(log.path, tmp_path / "train.png", key="rnn.l0.grad_c")
    img = np.asarray(Image.open(BytesIO(out.read_bytes())).convert("RGB"))
    assert img.shape[0] > 1000 and img.shape[1] > 900                  # five figures stacked
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100            # the heatmap's colours among them
    assert not list(tmp_path.glob(".*partial*"))


def test_refusals_at_start_are_one_line(log, tmp_path):
    from rnnscope.dashboards.watch_export import export_watch
    from rnnscope.errors import RnnscopeError
    with pytest.raises(RnnscopeError, match="no key"):
        export_watch(log.path, tmp_path / "x.png", key="rnn.l9.grad_h")
    with pytest.raises(RnnscopeError, match="FILE.png"):
        export_watch(log.path, tmp_path / "x.svg")
    log.append(block(30, 1))
    names = sorted((log.path / "blocks").iterdir())
    when = names[0].stat().st_mtime
    names[0].write_bytes(b"not arrow <script>")                  # a bad block before the last (bit rot: its
    os.utime(names[0], (when, when))                             # time stays; a torn write is the newest file)
    one_line_error(rnnscope("serve", log.path, check=False), "is not the last one")
    (log.path / "watch.json").write_text('{"format": "rnnscope-watch", "format_version": 1, "every": 0}')
    one_line_error(rnnscope("serve", log.path, check=False), "'every' is not a positive integer")


def test_a_torn_last_block_is_shown_as_dropped(log):
    log.append(block(30, 2))
    last = sorted((log.path / "blocks").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:100])                   # a disk that lost the block's tail
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = make_watch_document(Document(), log.path)
    assert list(page.views.loss.data["step"]) == [0, 10, 20] and "is torn" in page.status.text


def test_a_real_watch_on_a_training_loop_feeds_the_open_page(tmp_path):
    """A Watch on a tiny GRU tagger, trained while the page is open: each tick shows exactly the log."""
    import torch
    import torch.nn.functional as F

    import rnnscope as rs
    torch.manual_seed(0)
    emb, gru, head = torch.nn.Embedding(20, 8), torch.nn.GRU(8, 12, 2, batch_first=True), torch.nn.Linear(12, 20)
    model = torch.nn.ModuleDict({"emb": emb, "rnn": gru, "head": head})
    opt = torch.optim.SGD(model.parameters(), 0.5)
    page = None
    with rs.Watch(model, out=tmp_path / "train", every=2, flush_every=1) as watch:
        for step in range(8):
            x = torch.randint(0, 20, (4, 15))
            with watch.step(step):
                loss = F.cross_entropy(head(gru(emb(x[:, :-1]))[0]).flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                watch.loss(loss)
            watch.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            if step == 2:
                page = make_watch_document(Document(), tmp_path / "train")
            elif page:
                page.tick()
    log = open_watch_log(tmp_path / "train")
    v = page.views
    assert list(v.loss.data["step"]) == [0, 2, 4, 6]
    np.testing.assert_array_equal(v.loss.data["loss"], log.steps["loss"])
    assert list(v.clips.data["step"]) == log.steps.loc[log.steps.clipped | (log.steps.clips > 0), "step"].tolist()
    assert list(v.layers) == ["rnn.l0", "rnn.l1"] and wd.family(log.manifest, "rnn.l1") == "gru"
    np.testing.assert_array_equal(v.layers["rnn.l1"].data["sat_z"],
                                  log.layers.loc[log.layers.key == "rnn.l1", "sat_z"])
    mine = log.decay[(log.decay.key == page.key.value) & (log.decay.step == 6)].sort_values("lag")
    np.testing.assert_allclose(v.decay.data["image"][3][:, 0], mine["norm"].where(mine["norm"] > 0))


def test_sessions_share_one_reader_and_each_page_still_gets_every_new_block(log):
    """The server reads each block once whatever the number of pages (its one reader); a refresh made by
    one page's tick is still news to the other page, which streams the same rows."""
    from rnnscope.dashboards.watch_app import shared_log
    first, second = make_watch_document(Document(), log.path), make_watch_document(Document(), log.path)
    assert first.log is second.log is shared_log(log.path)
    log.append(block(30, 2))
    first.tick()                                   # reads the new block, for both
    second.tick()
    for page in (first, second):
        assert list(page.views.loss.data["step"]) == [0, 10, 20, 30, 40]
    assert sum(len(t) for t in first.log._frames["steps"]) == 5          # each block read once, not twice
    before = len(first.views.loss.data["step"])
    second.tick()                                  # nothing new: nothing streamed again
    assert len(second.views.loss.data["step"]) == before
