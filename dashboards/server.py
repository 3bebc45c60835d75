"""``rnnscope serve RUN``: the dashboard on a Bokeh server, bound to 127.0.0.1 unless told otherwise.
Pages and the websocket answer only requests whose Host names this server (its address and port, or
an ``--origin``), so a page on another name cannot reach it by rebinding that name's DNS to us; the
websocket's Origin is checked against the same list. Bokeh's ``autoload.js`` route (which embeds an
app into another site's page, answering any Origin with a session) is not served: these pages are
only ever opened as themselves."""
from __future__ import annotations

import socket

from rnnscope.errors import RnnscopeError, first_line

from .app import WINDOW, RunData, build, make_document

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY = "*"        # --origin '*': any Host and any Origin, said in one warning line at start
ANY_WARNING = ("rnnscope: warning: --origin '*' lets any web page, on any site, open sessions on this server "
               "and drive it; pass --origin HOST:PORT to name the pages that may")


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise RnnscopeError(f"port {port} is not a TCP port", "pass --port from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RnnscopeError(f"cannot resolve --host {host}", "pass an address of this machine, e.g. 127.0.0.1 or ::1") \
            from None
    family, *_, address = infos[0]
    with socket.socket(family) as s:
        try:
            s.bind(address)
        except PermissionError:
            raise RnnscopeError(f"no permission to listen on port {port}", "use a port above 1023") from None
        except OSError:
            raise RnnscopeError(f"port {port} on {host} is in use", "pass --port with a free port, or stop "
                                "the other server") from None


def netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_hosts(host: str, port: int, origins: list[str] | None = None) -> list[str]:
    """The ``HOST:PORT`` values a request's Host (and a websocket's Origin) may carry."""
    names = [host] + (["localhost"] if host in LOOPBACK else [])
    return [netloc(n, port) for n in names] + [o.lower() for o in origins or []]


def guard_hosts(server, allowed: list[str]) -> None:
    """Answer 403 to any request, page or websocket, whose Host is not in ``allowed`` (``*``: any), and
    404 to ``autoload.js``. Bokeh's server checks only the websocket's Origin; its tornado application
    (``server._tornado``: Bokeh gives no public handle) routes every request through ``find_handler``,
    so the checks sit there."""
    from tornado.web import ErrorHandler
    app = server._tornado
    route = app.find_handler
    ok = {a.lower() for a in allowed}
    app.websocket_origins.update(ok)       # Bokeh's own list cannot be given an IPv6 "[::1]:port"

    def find_handler(request, **kwargs):
        if ANY not in ok and (request.headers.get("Host") or "").lower() not in ok:
            return app.get_handler_delegate(request, ErrorHandler, {"status_code": 403})
        if request.path.rstrip("/").endswith("/autoload.js"):    # Access-Control-Allow-Origin: * and a session
            return app.get_handler_delegate(request, ErrorHandler, {"status_code": 404})
        return route(request, **kwargs)
    app.find_handler = find_handler


def refuse_unshowable(build, path, fix: str):
    """``build()``, with any failure but an ``RnnscopeError`` turned into one: what is served is
    untrusted, so whatever breaks while building a page from it is its problem, in one line."""
    try:
        return build()
    except RnnscopeError:
        raise
    except Exception as err:      # noqa: BLE001 -- see above
        first = first_line(err, None)
        raise RnnscopeError(f"{path} cannot be shown: {type(err).__name__}: {first}", fix) from None


def check_run(run_path, window: int) -> RunData:
    """Open the Run and build one page from it, before binding: a Run the dashboard cannot show is
    refused at start, in one line, instead of failing on every page."""
    from bokeh.document import Document

    def page():
        data = RunData(run_path, window)
        build(Document(), data)
        return data
    return refuse_unshowable(page, run_path, "probe and analyze it again")


def serve(run_path, *, port: int = 5006, host: str = "127.0.0.1", show: bool = False, window: int = WINDOW,
          origins: list[str] | None = None, log=print) -> None:
    """Serve the dashboard for one Run until interrupted. Browsers may reach it only as ``host:port``
    (and ``localhost:port`` for a loopback address) plus any ``origins`` given, e.g.
    ``myhost.lab:5006`` when serving on ``--host 0.0.0.0``."""
    data = check_run(run_path, window)                 # a missing, broken or incomplete Run stops here
    serve_documents(lambda doc: make_document(doc, data), data.run.path, port=port, host=host, show=show,
                    origins=origins, log=log)


def serve_documents(make, what, *, port: int = 5006, host: str = "127.0.0.1", show: bool = False,
                    origins: list[str] | None = None, log=print) -> None:
    """Serve the pages ``make(doc)`` builds (one per browser session) until interrupted, behind the
    same Host and Origin checks whatever the page shows (a Run, or a watch log); ``what`` names it."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    _check_port(host, port)
    allowed = allowed_hosts(host, port, origins)
    if ANY in allowed:
        import sys
        print(ANY_WARNING, file=sys.stderr, flush=True)
    app = Application(FunctionHandler(make))
    server = Server({"/": app}, port=port, address=host, allow_websocket_origin=[a for a in allowed if "[" not in a],
                    num_procs=1, check_unused_sessions_milliseconds=5000, unused_session_lifetime_milliseconds=15000)
    guard_hosts(server, allowed)
    server.start()
    log(f"serving {what} at http://{netloc(host, port)}/ (Ctrl-C to stop)", flush=True)
    if show:
        server.io_loop.add_callback(server.show, "/")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.stop()
