"""``rnnscope serve RUN``: the dashboard on a Bokeh server, bound to 127.0.0.1 unless told otherwise,
with the websocket origin checked against the address it serves."""
from __future__ import annotations

import socket

from rnnscope.probe import open_run
from rnnscope.errors import RnnscopeError

from .app import WINDOW, make_document


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except PermissionError:
            raise RnnscopeError(f"no permission to listen on port {port}", "use a port above 1023") from None
        except OSError:
            raise RnnscopeError(f"port {port} on {host} is in use", "pass --port with a free port, or stop "
                                "the other server") from None


def serve(run_path, *, port: int = 5006, host: str = "127.0.0.1", show: bool = False, window: int = WINDOW,
          origins: list[str] | None = None, log=print) -> None:
    """Serve the dashboard for one Run until interrupted. Browsers may open its websocket only from
    ``host:port`` (and ``localhost:port`` for the loopback address) plus any ``origins`` given, e.g.
    ``myhost.lab:5006`` when serving on ``--host 0.0.0.0``."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    run = open_run(run_path)                          # a missing or incomplete Run stops here
    if not run.keys():
        raise RnnscopeError(f"{run.path} holds no recorded keys", "probe again with some --kinds")
    _check_port(host, port)
    origins = [f"{host}:{port}"] + ([f"localhost:{port}"] if host in ("127.0.0.1", "localhost") else []) \
        + list(origins or [])
    app = Application(FunctionHandler(lambda doc: make_document(doc, run.path, window)))
    server = Server({"/": app}, port=port, address=host, allow_websocket_origin=origins,
                    num_procs=1, check_unused_sessions_milliseconds=5000, unused_session_lifetime_milliseconds=15000)
    server.start()
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}/"
    log(f"serving {run.path} at {url} (Ctrl-C to stop)", flush=True)
    if show:
        server.io_loop.add_callback(server.show, "/")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.stop()
