"""A Run from someone else is untrusted: the dashboard in a real browser over a Run whose text, key
names, feature names and every analysis-table string column carry script and TeX payloads, control
and bidi characters, and NaN states. Nothing may run, typeset, hide, or leak a traceback."""
import http.client
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from browser import column, free_port, get, served, set_prop, wait_for_model, wait_until, websocket_status
from test_cli import one_line_error

pytestmark = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")

# Each payload would set window.__pwned if it ever ran; none holds '.' or '/', so it can also be a
# PyTorch module name and a file name, as a key must be.
PAYLOADS = ["<img src=x onerror=self['__pwned']=1>", "<script>self['__pwned']=2</script>",
            "<a href=javascript:self['__pwned']=3>link</a>", "$$\\href{javascript:self['__pwned']=4}{x}$$",
            "$$x_1$$"]
MODULE = "<img src=x onerror=self['__pwned']=5>$$\\href{javascript:self['__pwned']=6}{x}$$"
BIDI = "a\u202eevil\u202c b\u2066c\u2069 d\u200ee\u200ff \x01\x1b\x7f\x85 end"
POISON = "\u00a4"                    # its embedding row is NaN: every state from here on is NaN
TEXT = ("int x = 1; /* plain */\n" * 12 + "\n".join(PAYLOADS) + "\n" + BIDI + "\n" + "int y;\n" * 12
        + POISON + " after the poison\n")
V = 64


class Wrapped(nn.Module):
    """A char model whose recurrent module sits under a hostile name (its keys carry the payload)."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        self.name = name
        self.embed = nn.Embedding(V, 8)
        with torch.no_grad():
            self.embed.weight[V - 1] = float("nan")
        self.add_module(name, nn.LSTM(8, 16, 1, batch_first=True))
        self.head = nn.Linear(16, V)

    def forward(self, ids):
        out, _ = getattr(self, self.name)(self.embed(ids))
        return self.head(out)


def encode(s: str) -> torch.Tensor:
    return torch.tensor([[V - 1 if c == POISON else ord(c) % (V - 1) for c in s]])


def module_name() -> str:
    """The hostile module name, as far as the key grammar lets a module name go (the store's grammar,
    where there is one, allows only letters, digits and '_')."""
    import importlib
    grammars = []
    for module in ("rnnscope.probe.keys", "rnnscope.store"):
        try:
            grammars.append(importlib.import_module(module).KEY)
        except (ImportError, AttributeError):
            pass
    return MODULE if all(g.match(f"{MODULE}.l0.h") for g in grammars) else "rnn"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from rnnscope.probe import record
    root = tmp_path_factory.mktemp("hostile")
    run = record(Wrapped(module_name()), TEXT, root / "run", encode=encode, grad=True, dtype="float32",
                 progress=False)
    keys = run.keys()
    h = next(k for k in keys if k.endswith(".h"))
    c = next(k for k in keys if k.endswith(".c"))
    units = [f"{c}:{i}" for i in range(6)] + [f"{h}:{i}" for i in range(6)]
    n = len(units)
    bad = lambda i: PAYLOADS[i % len(PAYLOADS)]      # noqa: E731
    # Keys, units and numbers as the tables' schema demands; every free string column hostile.
    neurons = pd.DataFrame({"unit": units, "key": [u.rsplit(":", 1)[0] for u in units],
                            "layer": 0, "kind": [bad(i) for i in range(n)],
                            "index": [int(u.rsplit(":", 1)[1]) for u in units],
                            "feature": [bad(i % 2) for i in range(n)], "metric": [bad(i + 2) for i in range(n)],
                            "direction": 1, "score": np.linspace(0.9, 0.1, n), "heldout_score": 0.5,
                            "q_value": np.geomspace(1e-9, 0.5, n), "strength": np.linspace(1, 0.1, n),
                            "selection_score": np.linspace(0.9, 0.1, n), "selection_q": np.geomspace(1e-9, 0.5, n),
                            "heldout_q": np.geomspace(1e-8, 0.9, n), "selectivity": 0.05})
    contexts = pd.DataFrame({"unit": [units[0]] * 4, "key": units[0].rsplit(":", 1)[0], "index": 0,
                             "side": ["top", "top", "bottom", "bottom"], "rank": [0, 1, 0, 1], "step": [3, 5, 7, 9],
                             "value": [1.0, 0.5, -0.5, -1.0], "start": 0, "offset": [3, 5, 7, 9],
                             "context": [bad(i) + "\u202e" for i in range(4)],
                             "values": [np.zeros(len(bad(i)) + 1, np.float32) for i in range(4)]})
    gates = [k for k in keys if k.rsplit(".", 1)[1] in ("i", "f", "o")]
    saturation = pd.DataFrame({"key": [gates[0], gates[0], gates[1], gates[1]], "layer": [0, 0, 1, 1],
                               "gate": [bad(2), "f", bad(4), "o"], "index": range(4),
                               "unit": [f"{gates[0]}:0", f"{gates[0]}:1", f"{gates[1]}:2", f"{gates[1]}:3"],
                               "left": [0.1, 0.2, 0.3, 0.4], "right": [0.4, 0.3, 0.2, 0.1], "mean": 0.5})
    grads = [k for k in keys if ".grad_" in k]
    decay = pd.DataFrame({"key": [grads[0]] * 3 + [grads[1]] * 3, "layer": 0, "kind": bad(1), "lag": [0, 1, 2] * 2,
                          "mean": 1.0, "geo_mean": [1, 0.5, 0.25] * 2, "q10": 0.1, "q90": 2.0, "positions": 3})
    lives = pd.DataFrame({"key": grads[:2], "layer": 0, "kind": bad(2), "slope_per_step": -0.5,
                          "half_life": [1.0, np.nan], "fit_r2": 0.9, "lag_to_1pct": 7, "max_lag": 2,
                          "exploding": False})
    (run.path / "analysis").mkdir(exist_ok=True)
    for name, t in (("neurons", neurons), ("contexts", contexts), ("saturation", saturation), ("grad_decay", decay),
                    ("half_lives", lives)):
        t.to_parquet(run.path / "analysis" / f"{name}.parquet")
    return run


# Every element, shadow roots included (Bokeh renders inside them), that the text could have made.
INJECTED = """const out = [];
const walk = (root) => { for (const el of root.querySelectorAll('*')) {
  const tag = el.tagName.toLowerCase(), href = (el.getAttribute('href') || '').trim().toLowerCase();
  if (tag === 'img' || tag.startsWith('mjx') || String(el.className).includes('MathJax') ||
      (tag === 'script' && el.textContent.includes('__pwned')) || (tag === 'a' && href.startsWith('javascript')))
    out.push(el.outerHTML.slice(0, 120));
  if (el.shadowRoot) walk(el.shadowRoot); } };
walk(document);
return out;"""

# Every label Bokeh would typeset: a string with TeX delimiters where a PlainText belongs.
TYPESET = """const bad = [];
const tex = (v) => typeof v === 'string' && /\\$\\$|\\\\\\[|\\\\\\(/.test(v);
for (const m of Bokeh.documents[0].all_models) {
  const name = m.constructor.__name__;
  if ((name === 'Div' || name === 'Paragraph') && !m.disable_math) bad.push(name + ' without disable_math');
  const plain = ['Div', 'Paragraph', 'PlainText'].includes(name);        // PlainText is never typeset
  for (const p of ['text', 'axis_label', 'title']) if (!plain && tex(m[p])) bad.push(name + '.' + p);
  const o = m.major_label_overrides;
  if (o) for (const v of (o instanceof Map ? o.values() : Object.values(o))) if (tex(v)) bad.push(name + ' tick');
}
return bad;"""


def _open(driver, url):
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(url)


def _safe(driver):
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script(INJECTED) == []
    assert driver.execute_script(TYPESET) == [], driver.execute_script(TYPESET)
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _select(driver, source, indices):
    driver.execute_script("Bokeh.documents[0].get_model_by_name(arguments[0]).selected.indices = arguments[1]",
                          source, indices)


def test_no_payload_runs_or_typesets_in_any_view(hostile, driver):
    with served(hostile.path) as (url, _):
        _open(driver, url)
        wait_for_model(driver, "neuron_rows")
        info = wait_until(lambda: get(driver, "unit_info", "text"))
        assert "&lt;" in info and "<img" not in info                     # escaped, not stripped
        shown = column(driver, "context_rows", "context")                 # hostile contexts: plain text
        assert any("onerror=" in c for c in shown) and all("\u202e" not in c for c in shown)
        for tab in range(6):
            set_prop(driver, "views", "active", tab)
            time.sleep(0.4)
            _safe(driver)
        for feature in PAYLOADS[:2]:                                      # hostile feature names
            set_prop(driver, "feature_filter", "value", feature)
            wait_until(lambda: set(column(driver, "neuron_rows", "feature")) == {feature})
        unit = column(driver, "neuron_rows", "unit")[1]
        _select(driver, "neuron_rows", [1])
        wait_until(lambda: f"{get(driver, 'unit_key', 'value')}:{get(driver, 'unit_index', 'value')}" == unit)
        key = next(k for k in hostile.keys() if k.endswith(".h"))
        set_prop(driver, "unit_key", "value", key)                         # the hostile key everywhere
        wait_until(lambda: get(driver, "unit_key", "value") == key)
        set_prop(driver, "heat_mode", "value", "whole key")
        chars = column(driver, "text_source", "char")
        a = "".join(chars).index("$$\\href")
        _select(driver, "text_source", list(range(a, a + 40)))            # pattern search over a payload
        rows = wait_until(lambda: column(driver, "pattern_rows", "unit"))
        note = get(driver, "pattern_info", "text")
        assert "$$\\href" in note and "<a " not in note
        _select(driver, "pattern_rows", [0])
        wait_until(lambda: f"{get(driver, 'unit_key', 'value')}:{get(driver, 'unit_index', 'value')}" == rows[0])
        set_prop(driver, "views", "active", 5)
        time.sleep(0.5)
        _safe(driver)


def test_control_and_bidi_characters_are_drawn_visibly(hostile, driver):
    with served(hostile.path) as (url, _):
        _open(driver, url)
        wait_for_model(driver, "lines_source")
        drawn = "\n".join(column(driver, "lines_source", "line"))
        for ch in "\u202e\u202c\u2066\u2069\u200e\u200f\x01\x1b\x7f\x85":
            assert ch not in drawn and f"\u27e8U+{ord(ch):04X}\u27e9" in drawn
        chars = column(driver, "text_source", "char")
        assert "\u27e8U+202E\u27e9" in chars                             # the hover names the code point
        assert len(chars) == len(hostile.text)                          # still one cell per stored character


def test_nan_is_shown_as_nan_in_its_own_legible_colour(hostile, driver):
    from rnnscope.dashboards.figures import contrast
    start = hostile.text.index(POISON)
    with served(hostile.path) as (url, _):
        _open(driver, url)
        wait_for_model(driver, "text_source")
        values = driver.execute_script("const s = Bokeh.documents[0].get_model_by_name('text_source');"
                                       "const v = s.data.get ? s.data.get('value') : s.data['value'];"
                                       "return Array.from(v).map(x => Number.isNaN(x));")
        assert not any(values[:start]) and all(values[start + 1:])
        glyphs = driver.execute_script("""const d = Bokeh.documents[0];
            const cells = d.get_model_by_name('text_cells').glyph.fill_color.transform;
            return [Array.from(cells.palette), cells.nan_color, d.get_model_by_name('text_ink').glyph.text_color];""")
        palette, nan, ink = glyphs
        ink = ink if isinstance(ink, str) else ink["value"]
        assert nan not in palette
        for colour in (palette[0], palette[len(palette) // 2], palette[-1], nan):   # both extremes, 0, NaN
            assert contrast(colour, ink) >= 4.5, colour


def _http(host: str, port: int, header_host: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("GET", "/", skip_host=True)
        conn.putheader("Host", header_host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_pages_answer_only_their_own_host(hostile):
    with served(hostile.path, "--origin", "myhost.lab:80") as (url, _):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert _http("127.0.0.1", port, f"127.0.0.1:{port}") == 200
        assert _http("127.0.0.1", port, f"localhost:{port}") == 200
        assert _http("127.0.0.1", port, "myhost.lab:80") == 200
        for foreign in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", ""):
            assert _http("127.0.0.1", port, foreign) == 403, foreign


def test_ipv6_loopback_serves(hostile):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with served(hostile.path, host="::1") as (url, _):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert _http("::1", port, f"[::1]:{port}") == 200
        assert _http("::1", port, f"evil.example:{port}") == 403
        assert websocket_status(f"ws://[::1]:{port}/ws", f"http://[::1]:{port}") is True
        assert websocket_status(f"ws://[::1]:{port}/ws", "http://evil.example:80") == 403



def test_broken_tables_are_refused_at_start_and_a_broken_page_shows_no_traceback(hostile, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hostile.path, broken)
    (broken / "analysis" / "neurons.parquet").write_bytes(b"not parquet <script>")
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", "serve", str(broken), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)      # a server that starts fails here
    one_line_error(proc, str(broken))                                # refused in one line, at start
    gone = tmp_path / "gone"
    shutil.copytree(hostile.path, gone)
    with served(gone) as (url, _):
        for f in (gone / "states").iterdir():
            f.unlink()                                    # the Run breaks while it is served
        port = int(url.rsplit(":", 1)[1].strip("/"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/")
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200 and "Traceback" not in body and "File \"" not in body


def test_notebook_html_inlines_bokehjs_and_escapes_the_text(hostile):
    from rnnscope.dashboards.notebook import unit_html
    key = next(k for k in hostile.keys() if k.endswith(".c"))
    page = unit_html(hostile, f"{key}:3")
    assert "<script src=" not in page and "cdn.bokeh.org" not in page
    assert "Bokeh.embed" in page and len(page) > 500_000                 # BokehJS itself is in the page
    for payload in PAYLOADS[:3]:
        assert payload not in page                                        # only ever as escaped JSON data
    assert "U+202E" in page and "\u202e" not in page                   # drawn visibly, not as an override


def test_jupyter_show_and_run_repr_escape_everything(hostile):
    import rnnscope as rs
    key = next(k for k in hostile.keys() if k.endswith(".c"))
    view = rs.show(hostile, f"{key}:3")
    page = view._repr_html_()
    assert "Bokeh.embed" in page and all(p not in page for p in PAYLOADS[:3])
    summary = hostile._repr_html_()
    assert key in summary and "<script" not in summary and "<img" not in summary
    with pytest.raises(rs.RnnscopeError):
        rs.show(hostile, f"{key}:99999")       # a bad unit fails at the call, not later at display
