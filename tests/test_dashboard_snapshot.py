"""A served Run is one snapshot (issue 24): `rnnscope probe --overwrite` replaces the Run while it is
served; a page opened before keeps drawing the Run it opened (its text with its values), a page
opened after draws the new Run whole, and a deleted Run gives new pages one line and old pages no
error. Real Runs, a real server process and a real browser; and the same in-process, without one."""
import shutil

import numpy as np
import pytest

from browser import column, get, served, set_prop, wait_for_model, wait_until
from test_cli import rnnscope

FIRST = "int main(void) { return 0; }\n" * 40
SECOND = "/* a comment, then a string */ s = \"quoted\";\n" * 30


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    (root / "a.c").write_text(FIRST)
    (root / "b.c").write_text(SECOND)
    return root


def probe(texts, name: str, out, *extra):
    rnnscope("probe", "zoo:gru-linux", "--text", texts / name, "--out", out, "--kinds", "h", "--dtype", "float32",
             *extra)


def _values(run, key, index, steps):
    return [float(run[key][t, index]) for t in steps]


def test_sessions_keep_the_run_they_opened_and_new_ones_see_the_new_run(texts, tmp_path):
    from rnnscope.dashboards.app import RunData, make_document
    from rnnscope.probe import open_run
    from bokeh.document import Document
    out = tmp_path / "run"
    probe(texts, "a.c", out)
    data = RunData(out)
    old = open_run(out)
    key = data.first_selection().key
    before = np.array(old[key][:, 3], np.float64)
    probe(texts, "b.c", out, "--overwrite")                 # swapped in under the same name
    assert np.array_equal(np.asarray(data.run[key][:, 3], np.float64), before)    # the held Run reads its own
    assert data.run.text == FIRST
    fresh = data.current()
    assert fresh is not data and fresh.run.text == SECOND and fresh.current() is fresh
    np.testing.assert_array_equal(np.asarray(fresh.run[key][:, 3]), np.asarray(open_run(out)[key][:, 3]))
    assert data.current() is fresh                          # one reopen, shared by every later session
    shutil.rmtree(out)
    np.testing.assert_array_equal(np.asarray(data.run[key][:, 3], np.float64), before)   # still readable
    doc = Document()
    assert make_document(doc, data) is None                 # a new page: one line, no traceback
    error = doc.get_model_by_name("page_error")
    assert "changed on disk" in error.text and "Traceback" not in error.text


def test_analysis_tables_written_while_served_reach_new_sessions(texts, tmp_path):
    from rnnscope.dashboards.app import RunData
    out = tmp_path / "run"
    probe(texts, "a.c", out)
    data = RunData(out)
    assert data.neurons is None and data.current() is data
    rnnscope("analyze", out, "--shifts", "2", "--max-lag", "30")          # writes analysis/ while served
    fresh = data.current()
    assert fresh.neurons is not None and data.neurons is None


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")
def test_a_run_replaced_while_served_in_a_real_browser(texts, tmp_path, driver):
    from rnnscope.probe import open_run
    out = tmp_path / "run"
    probe(texts, "a.c", out)
    with served(out) as (url, proc):
        driver.get(url)
        wait_for_model(driver, "text_source")
        key = get(driver, "unit_key", "value")
        first = np.array(open_run(out)[key], np.float64)    # read now: a plain Run reopens its files by path
        probe(texts, "b.c", out, "--overwrite")
        set_prop(driver, "unit_index", "value", 5)          # the page opened before asks for a new unit
        wait_until(lambda: get(driver, "unit_info", "text") and f"{key}:5" in get(driver, "unit_info", "text"))
        steps = column(driver, "text_source", "step")
        wait_until(lambda: column(driver, "text_source", "value")[:50] ==
                   pytest.approx(first[steps[:50], 5].tolist(), rel=1e-6))
        assert "".join(column(driver, "lines_source", "line")).startswith("int main")   # its own text
        driver.get("about:blank")
        driver.get(url)                                     # a new page: the new Run, text and values
        wait_for_model(driver, "text_source")
        wait_until(lambda: "comment" in "".join(column(driver, "lines_source", "line")))
        second = open_run(out)
        steps, values = column(driver, "text_source", "step"), column(driver, "text_source", "value")
        index = get(driver, "unit_index", "value")
        assert values[:50] == pytest.approx(_values(second, key, index, steps[:50]), rel=1e-6)
        set_prop(driver, "unit_index", "value", (index + 1) % 8)
        shutil.rmtree(out)                                  # deleted while a page is open
        wait_until(lambda: column(driver, "text_source", "value") != values)
        driver.get("about:blank")
        driver.get(url)
        wait_for_model(driver, "page_error", timeout=60)
        assert "changed on disk" in get(driver, "page_error", "text")
    assert "FileNotFoundError" not in proc.stderr.read()
