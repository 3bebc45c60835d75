"""``rnnscope serve LOG`` on a watch log: training seen as it happens.

Views: the loss per watched step with clipping events and flagged steps marked; the global gradient
norm before and after clipping; the half-life of the gradient through time per layer; a heatmap of
the gradient-decay norm over (lag back from the loss, training step) for the state key chosen in a
Select; the saturated fraction of each gate. All against the training step.

Live: each browser session holds its own reader of the log; a periodic callback (every
``REFRESH_MS``) calls ``log.refresh()`` and appends the new rows to the views' sources with
``ColumnDataSource.stream``, so the page grows without a redraw or a replaced ``.data``. Only
choosing another key replaces the heatmap's data. Everything read from the log is untrusted: names
go into the page escaped (``queries.esc``) in Divs that never typeset TeX, or as canvas text.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

from bokeh.layouts import column, row
from bokeh.models import Select

from rnnscope.errors import RnnscopeError, first_line
from rnnscope.store.watchlog import open_watch_log

from . import watch_data as wd
from . import watch_figures as wf
from .queries import esc, fmt
from .views import div

REFRESH_MS = 1000        # the log gains a block every `every` training steps: seconds apart at best
TABLES = ("steps", "decay", "layers")
log = logging.getLogger(__name__)


def describe(manifest: dict) -> str:
    """The page's header, escaped: the model's class and recurrent modules, and the watch interval."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    modules = model.get("modules") if isinstance(model.get("modules"), dict) else {}
    parts = [f"{esc(name)}: {esc(m.get('type', '?'))} x{esc(m.get('layers', '?'))}, {esc(m.get('hidden', '?'))} units"
             for name, m in modules.items() if isinstance(m, dict)]
    return (f"<b>{esc(model.get('class', 'model'))}</b> ({'; '.join(parts) or 'no recurrent modules listed'}), "
            f"watched every {esc(manifest.get('every', '?'))} steps")


_LOGS: dict = {}


def shared_log(path):
    """The server's one reader of the watch log at ``path``: its blocks read once, at the first page, then
    only the new ones, however many sessions are open (3,000 blocks took 11 s for each page load when
    every session read them all); each page keeps its own place in it (``LivePage.seen``)."""
    try:                         # a log started afresh in the same folder is another log: read it anew
        key = (str(Path(path).resolve()), os.stat(Path(path) / "watch.json").st_ino)
    except OSError:
        return open_watch_log(path)              # its one-line refusal
    if key not in _LOGS:
        _LOGS[key] = open_watch_log(path)
    return _LOGS[key]


class LivePage:
    """One session's page over a watch log (the server's shared reader: each page keeps how far it has
    shown each table, so a refresh another page made is still news here)."""

    def __init__(self, watch_log):
        self.log, m = watch_log, watch_log.manifest
        keys = wd.grad_keys(m)
        steps, decay, rows = self.log.steps, self.log.decay, self.log.layers
        self.seen = {"steps": len(steps), "decay": len(decay), "layers": len(rows)}
        self.key = Select(title="gradient decay of", options=keys, value=keys[0] if keys else "", name="decay_key")
        self.views = v = wf.WatchViews(m, steps, decay, rows, self.key.value)
        self.status = div("", name="watch_status", width=900)
        self.show_status()
        self.key.on_change("value", self.choose)
        self.root = column(div(describe(m), name="watch_header", width=900), self.status, *v.lines,
                           row(self.key), v.heat, v.saturation, name="watch_dashboard")

    def show_status(self, problem: str = "") -> None:
        steps = self.views.loss.data["step"]
        last = f", the last at training step {fmt(steps[-1])}" if len(steps) else ""
        text = f"{len(steps):,} watched steps{last}; read at {time.strftime('%H:%M:%S')}"
        if self.log.dropped and not problem:
            problem = f"the last block {self.log.dropped} is torn: its steps are not shown"
        self.status.text = text + (f' <span style="color:#b00">— {esc(problem)}</span>' if problem else "")

    def _new(self, name: str):
        table = getattr(self.log, name)
        new, self.seen[name] = table.iloc[self.seen[name]:], len(table)
        return new

    def tick(self) -> None:
        """Read the blocks written since the last tick and append their rows to every view."""
        v = self.views
        try:
            self.log.refresh()
            steps, decay, rows = (self._new(t) for t in TABLES)
        except RnnscopeError as err:       # a broken block: say so and keep what was shown
            self.show_status(str(err))
            return
        if not (len(steps) or len(decay) or len(rows)):
            self.show_status()
            return
        if len(steps):
            v.loss.stream(wd.loss_rows(steps))
            v.clips.stream(wd.clip_rows(steps))
            flags, v.last_loss = wd.flag_rows(steps, v.last_loss)
            v.flags.stream(flags)
        for k, src in v.layers.items():
            new = wd.layer_rows(rows, k)
            if len(new["step"]):
                src.stream(new)
        images = wd.decay_images(decay, self.key.value, v.every)
        if images["step"]:
            v.decay.stream(images)
            v.set_range(*wd.norm_range(images["image"], *v.range))
        self.show_status()

    def choose(self, attr, old, new) -> None:
        """Another key: its whole heatmap (the one place the data is replaced, on the user's request)."""
        images = wd.decay_images(self.log.decay, new, self.views.every)
        self.views.set_range(*wd.norm_range(images["image"]))
        self.views.decay.data = images


def make_watch_document(doc, path, refresh_ms: int = REFRESH_MS):
    """One session's page, refreshed every ``refresh_ms``. A failure shows one escaped line (the
    traceback goes to the server's log only)."""
    try:
        page = LivePage(shared_log(path))
        doc.add_root(page.root)
        doc.add_periodic_callback(page.tick, refresh_ms)
        doc.title = "rnnscope: training"
        return page
    except Exception as err:      # noqa: BLE001 -- whatever broke, the page says so in one line
        if not isinstance(err, RnnscopeError):
            log.error("watch page failed:\n%s", traceback.format_exc())
        doc.clear()
        doc.add_root(div(f"<p>rnnscope: error: {esc(first_line(err))}</p>",
                         name="page_error", width=900))
        return None


def check_log(path) -> None:
    """Open the log and build one page from it before binding: a log the page cannot show is refused
    at start, in one line."""
    from .server import refuse_unshowable
    refuse_unshowable(lambda: LivePage(shared_log(path)), path, "check that it is a watch log written by "
                      "rnnscope.Watch")


def serve_watch(path, *, port: int = 5006, host: str = "127.0.0.1", show: bool = False,
                origins: list[str] | None = None, log=print) -> None:
    """Serve the live training page for the watch log at ``path`` until interrupted."""
    from .server import serve_documents
    check_log(path)
    serve_documents(lambda doc: make_watch_document(doc, path), f"the watch log {path}", port=port, host=host,
                    show=show, origins=origins, log=log)
