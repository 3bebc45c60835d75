"""Helpers for the browser tests and the dashboard benchmark: start `rnnscope serve` as a real
process on a free port, and drive the page through BokehJS's document model."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def served(run, *args, host: str = "127.0.0.1"):
    port = free_port(host)
    proc = subprocess.Popen([sys.executable, "-m", "rnnscope.cli", "serve", str(run), "--port", str(port),
                             "--host", host, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    try:
        deadline = time.time() + 180          # a loaded 2-core machine takes a minute to import and check
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()}")
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


MODEL = "const doc = Bokeh.documents[0]; const m = doc && doc.get_model_by_name(arguments[0]);"


def wait_for_model(driver, name: str, timeout: float = 30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ok = driver.execute_script("return (window.Bokeh !== undefined) && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name(arguments[0]) != null", name)
        if ok:
            return
        time.sleep(0.05)
    raise TimeoutError(f"model {name} never appeared")


def get(driver, name: str, prop: str):
    return driver.execute_script(MODEL + " return m[arguments[1]];", name, prop)


def column(driver, source: str, col: str):
    return driver.execute_script(MODEL + " return Array.from(m.data.get ? m.data.get(arguments[1]) "
                                 ": m.data[arguments[1]]);", source, col)


def set_prop(driver, name: str, prop: str, value) -> None:
    driver.execute_script(MODEL + " m[arguments[1]] = arguments[2];", name, prop, value)


def wait_until(fn, timeout: float = 20, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("condition not met")


def websocket_status(ws: str, origin: str):
    """True when a websocket from ``origin`` opens at ``ws``, else the HTTP status it was refused with."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    async def connect():
        try:
            conn = await websocket_connect(HTTPRequest(ws, headers={"Origin": origin}))
            conn.close()
            return True
        except HTTPClientError as err:
            return err.code
    return IOLoop.current().run_sync(connect)
