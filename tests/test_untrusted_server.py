"""Issue 24, the server: no autoload.js route answering any page with a session, and ``--origin '*'``
only with a warning that any page may then drive the server."""
import http.client

import pytest

from browser import served
from conftest import char_model
from rnnscope import probe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from rnnscope.zoo import Vocab
    vocab = Vocab("\t\n \"#(),0;?abcdefghijklmnopqrstuvwxyz{}")
    return probe.record(char_model("gru", vocab, hidden=6), "if (a) { b(c); }\n" * 8,
                        tmp_path_factory.mktemp("srv") / "run", progress=False).path


def _get(port: int, path: str, host: str, origin: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        if origin:
            conn.putheader("Origin", origin)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_autoload_js_is_not_served_to_any_page(run_dir):
    with served(run_dir) as (url, _):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        attack = "/autoload.js?bokeh-autoload-element=x%27%3Balert(1)%3B%22&bokeh-absolute-url=http://evil.example"
        status, headers, body = _get(port, attack, f"127.0.0.1:{port}", origin="http://evil.example")
        assert status == 404
        assert "Access-Control-Allow-Origin" not in headers and b"alert(1)" not in body
        assert _get(port, "/", f"127.0.0.1:{port}")[0] == 200                     # the page itself still is


def test_origin_star_is_accepted_only_with_a_warning(run_dir):
    with served(run_dir, "--origin", "*") as (url, proc):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert _get(port, "/", "any.example:80")[0] == 200                        # as asked: any name
    err = proc.stderr.read()
    warnings = [line for line in err.splitlines() if "--origin '*'" in line]
    assert len(warnings) == 1 and "any web page" in warnings[0]
    with served(run_dir) as (url, proc):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert _get(port, "/", "any.example:80")[0] == 403
    assert "--origin" not in proc.stderr.read()
