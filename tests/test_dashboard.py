"""The dashboard in a real browser: `rnnscope serve` as a process, headless Chromium driving it.
Also the exporters' files, checked for real content, and the server's refusals."""
import shutil
import time
import xml.etree.ElementTree as ET
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from browser import column, get, served, set_prop, wait_for_model, wait_until, websocket_status
from test_cli import one_line_error, rnnscope

pytestmark = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")

PAYLOADS = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">',
            '"><svg onload="window.__xss = 3">']


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    text = open("zoo/samples/linux.c").read()[:2500]
    text = text + "\n/* " + " */\n/* ".join(PAYLOADS) + " */\n" + "\n".join(f's = "{p}";' for p in PAYLOADS) + "\n"
    (root / "t.c").write_text(text)
    rnnscope("probe", "zoo:lstm-linux", "--text", root / "t.c", "--out", root / "run", "--grad")
    rnnscope("analyze", root / "run", "--shifts", "4", "--max-lag", "30")
    rnnscope("probe", "zoo:gru-linux", "--text", root / "t.c", "--out", root / "bare", "--kinds", "h")
    return root


def _open(driver, url):
    """Load the app, after dropping the console messages of earlier pages (whose servers have gone)."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(url)


def _errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _text_pixels(driver) -> np.ndarray:
    png = driver.get_screenshot_as_png()
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))[80:700, :900].astype(int)


def test_page_renders_the_text_and_a_unit_change_recolours_it(run_dir, driver):
    text = (run_dir / "run" / "text.txt").read_text()
    with served(run_dir / "run") as (url, _):
        _open(driver, url)
        wait_for_model(driver, "text_source")
        chars = column(driver, "text_source", "char")
        assert "".join(chars).replace("\u21b5", "\n") == text.replace("\t", " ")   # one cell per character
        lines = column(driver, "lines_source", "line")
        drawn = "".join(line.rstrip("\u21b5") + "\n" for line in lines)[:-1]
        assert drawn == text.expandtabs(8)                        # the text, drawn as text
        time.sleep(0.5)
        before = _text_pixels(driver)
        values = column(driver, "text_source", "value")
        index = get(driver, "unit_index", "value")
        set_prop(driver, "unit_index", "value", (index + 1) % 256)
        wait_until(lambda: column(driver, "text_source", "value") != values)
        time.sleep(0.5)
        after = _text_pixels(driver)
        assert (np.abs(after - before).sum(-1) > 30).mean() > 0.01        # the colours changed on screen
        assert len(np.unique(after.reshape(-1, 3), axis=0)) > 20           # and are not one flat colour
        assert driver.execute_script("return window.__xss === undefined")
        assert not _errors(driver)


def test_neuron_table_click_selects_the_unit(run_dir, driver):
    with served(run_dir / "run") as (url, _):
        _open(driver, url)
        wait_for_model(driver, "neuron_rows")
        units = column(driver, "neuron_rows", "unit")
        target = units[3]
        driver.execute_script("Bokeh.documents[0].get_model_by_name('neuron_rows').selected.indices = [3]")
        key, index = target.rsplit(":", 1)
        wait_until(lambda: get(driver, "unit_key", "value") == key and get(driver, "unit_index", "value") == int(index))
        info = wait_until(lambda: target in get(driver, "unit_info", "text") and get(driver, "unit_info", "text"))
        assert "characters 0" in info
        assert not _errors(driver)


def test_top_contexts_follow_the_selected_unit_and_a_click_pages_to_the_step(run_dir, driver):
    from rnnscope.probe import open_run
    run = open_run(run_dir / "run")
    with served(run_dir / "run", "--window", "400") as (url, _):
        _open(driver, url)
        wait_for_model(driver, "context_rows")
        key, index = get(driver, "unit_key", "value"), get(driver, "unit_index", "value")
        values = np.asarray(run[key][:, index], np.float64)
        sides = column(driver, "context_rows", "side")
        steps = [int(v) for v in column(driver, "context_rows", "step")]
        top = [st for sd, st in zip(sides, steps) if sd == "top"]
        assert top[0] == int(np.argmax(values)) and len(top) == 10    # the unit's highest step comes first
        assert all("[" in c for c in column(driver, "context_rows", "context"))
        set_prop(driver, "unit_index", "value", (index + 1) % 256)
        wait_until(lambda: [int(v) for v in column(driver, "context_rows", "step")] != steps)
        new_top = int(column(driver, "context_rows", "step")[0])
        assert new_top == int(np.argmax(np.asarray(run[key][:, (index + 1) % 256], np.float64)))
        rows = [int(v) for v in column(driver, "context_rows", "step")]
        far = next(i for i, st in enumerate(rows) if st > 400)     # a step beyond the first page
        driver.execute_script("Bokeh.documents[0].get_model_by_name('context_rows').selected.indices = arguments[0]",
                              [far])
        wait_until(lambda: get(driver, "window_start", "value") == rows[far] - 200)
        assert not _errors(driver)


def test_pattern_search_ranks_units_for_a_selected_span(run_dir, driver):
    with served(run_dir / "run") as (url, _):
        _open(driver, url)
        wait_for_model(driver, "text_source")
        chars = "".join(column(driver, "text_source", "char"))
        a = chars.index("<script>")
        driver.execute_script("Bokeh.documents[0].get_model_by_name('text_source').selected.indices = arguments[0]",
                              list(range(a, a + 30)))
        rows = wait_until(lambda: column(driver, "pattern_rows", "unit"))
        scores = column(driver, "pattern_rows", "score")
        assert len(rows) == 20 and scores == sorted(scores, reverse=True)
        info = get(driver, "pattern_info", "text")
        assert "&lt;script&gt;" in info and "<script>" not in info        # the span is shown escaped
        assert driver.execute_script("return window.__xss === undefined")


def test_views_without_data_say_which_command_makes_it(run_dir, driver):
    with served(run_dir / "bare") as (url, _):
        _open(driver, url)
        wait_for_model(driver, "text_source")
        html = driver.execute_script(
            "return Bokeh.documents[0].all_models ? Array.from(Bokeh.documents[0].all_models)"
            ".filter(m => m.type === 'Div' || (m.constructor && m.constructor.name === 'Div'))"
            ".map(m => m.text).join(' ') : ''")
        assert "rnnscope analyze" in html and "--grad" in html
        assert get(driver, "unit_key", "value") == "rnn.l1.h"
        assert not _errors(driver)


def test_server_refusals(run_dir, tmp_path):
    one_line_error(rnnscope("serve", tmp_path / "missing", check=False), "no run at")
    with served(run_dir / "run") as (url, _):
        port = url.rsplit(":", 1)[1].strip("/")
        one_line_error(rnnscope("serve", run_dir / "run", "--port", port, check=False), f"port {port} on 127.0.0.1 is in use")
    partial = tmp_path / "partial"
    shutil.copytree(run_dir / "run", partial)
    manifest = (partial / "manifest.json").read_text().replace('"complete": true', '"complete": false')
    (partial / "manifest.json").write_text(manifest)
    one_line_error(rnnscope("serve", partial, check=False), "incomplete run")


def test_websocket_origin_is_checked(run_dir):
    """A page from another origin cannot open the app's websocket."""
    with served(run_dir / "run") as (url, _):
        ws = url.replace("http", "ws") + "ws"
        assert websocket_status(ws, "http://evil.example:80") == 403
        assert websocket_status(ws, url.rstrip("/")) is True              # its own page may


def test_exports_have_real_content(run_dir, tmp_path):
    run = run_dir / "run"
    rnnscope("export", run, "--unit", "rnn.l0.c:10", "--start", "0", "--end", "1500", "--out", tmp_path / "u.png")
    img = np.asarray(Image.open(tmp_path / "u.png").convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    rnnscope("export", run, "--feature", "in_comment", "--top", "5", "--out", tmp_path / "h.svg")
    root = ET.parse(tmp_path / "h.svg").getroot()
    assert root.tag.endswith("svg") and len(list(root.iter())) > 50
    rnnscope("export", run, "--units", "rnn.l0.c:1,rnn.l1.h:2", "--out", tmp_path / "h.html")
    page = (tmp_path / "h.html").read_text()
    assert "cdn.bokeh.org" not in page and "<script src=" not in page        # BokehJS inlined
    from rnnscope.dashboards.export import chromium_driver
    d = chromium_driver(console_log=True)
    try:
        d.get((tmp_path / "h.html").as_uri())
        wait_until(lambda: d.execute_script("return window.Bokeh !== undefined && Bokeh.documents.length > 0"))
        assert d.execute_script("return document.querySelectorAll('.bk-Figure, .bk-Column, div').length") > 0
        assert not [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        d.quit()
    assert not list(tmp_path.glob(".*partial*"))


def test_export_refusals(run_dir, tmp_path):
    run = run_dir / "run"
    one_line_error(rnnscope("export", run, "--unit", "rnn.l0.c:999", "--out", tmp_path / "x.png", check=False),
                   "unknown unit rnn.l0.c:999")
    one_line_error(rnnscope("export", run, "--unit", "rnn.l9.c:1", "--out", tmp_path / "x.png", check=False),
                   "the run has no key")
    one_line_error(rnnscope("export", run, "--unit", "rnn.l0.c:1", "--out", tmp_path / "x.jpg", check=False),
                   "x.jpg")
    one_line_error(rnnscope("export", run, "--unit", "rnn.l0.c:1", "--start", "5", "--end", "2", "--out",
                            tmp_path / "x.png", check=False), "are not inside")
    one_line_error(rnnscope("export", run_dir / "bare", "--feature", "in_comment", "--out", tmp_path / "x.png",
                            check=False), "no neuron table")
    assert not list(tmp_path.iterdir())


def test_numbers_are_formatted_for_reading():
    from rnnscope.dashboards.queries import fmt
    assert [fmt(x) for x in (0.123456, 12.3456, 1234.5, 0.0123456, 0.00123456, 1.23456e-5, 3.0e-300, 0.0,
                             -0.5, float("nan"))] == \
        ["0.123", "12.3", "1.23e+03", "0.0123", "0.00123", "1.23e-05", "3.00e-300", "0", "-0.5", "NaN"]


def test_selection_tells_watchers_what_changed_and_nothing_else():
    from rnnscope.dashboards.state import Selection
    sel, seen = Selection("rnn.l0.c", 3), []
    sel.watch(seen.append)
    sel.set(key="rnn.l0.c", index=3)                  # no change: a mirrored widget cannot loop
    sel.set(index=4, start=100)
    sel.set(feature="in_comment")
    assert seen == [{"index", "start"}, {"feature"}] and sel.unit == "rnn.l0.c:4"
    with pytest.raises(TypeError):
        sel.set(colour="red")
