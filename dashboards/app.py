"""The dashboard: one Bokeh document per browser session, built from a Run and its analysis tables.

Views over one selection (``state.Selection``: unit, page of steps, feature, document): the text
coloured by the selected unit, one step's span (a character, subword or word) at a time; the unit picker; the neuron table (click a row to show its unit); a
units x time heatmap of the page; gradient flow (per-step norms of the page, the decay curve); gate
saturation (the paper's scatter); pattern search (select a span of text, get the units on inside it
and off around it). Controls change the selection; each view updates its own ``ColumnDataSource``;
no figure is rebuilt after the first paint. The first paint carries the controls, the text and the
open tab; the other tabs follow it (``tabs.LazyTabs``). A session reads only the files its
``RunData`` opened (``snapshot``): a Run replaced while served is shown whole to new sessions.
"""
from __future__ import annotations

import logging
import time
import traceback

from bokeh.layouts import column, row

from rnnscope.store import parse_key, read_table

from rnnscope.errors import RnnscopeError, first_line

from .attention import AttentionView
from .frames import LineView
from .plots import GradientView, SaturationView
from .queries import axis_name, checked, esc, step_word
from .snapshot import hold, same
from .state import Selection
from .tabs import LazyTabs
from .steps import Documents, page
from .views import Controls, ContextsView, HeatmapView, NeuronView, PatternView, TextView, div

WINDOW = 10000           # steps on one page of text
TABLES = ("neurons", "contexts", "saturation", "grad_decay", "half_lives")
log = logging.getLogger(__name__)


class RunData:
    """A Run and the analysis tables the views read, opened and checked once (``serve`` does this
    before it binds, so a broken Run is refused at start rather than on every page)."""

    def __init__(self, run_path, window: int = WINDOW):
        if window < 1:
            raise RnnscopeError(f"--window {window} shows no text", "pass --window 1 or more")
        self.run, self.tables, self.seen = hold(run_path, lambda run: {name: read_table(run, name) for name in TABLES})
        self.window, self.text, self.keys = window, self.run.text, self.run.keys()
        if not self.keys:
            raise RnnscopeError(f"{self.run.path} holds no recorded keys", "probe again with some --kinds")
        self.state_keys = [k for k in self.keys if not parse_key(k)["kind"].startswith("grad_")]
        self.grad_keys = [k for k in self.keys if parse_key(k)["kind"].startswith("grad_")]
        self.units = {k: int(self.run[k].shape[1]) for k in self.keys}
        self.why = {}
        for name in TABLES:
            self.tables[name], self.why[name] = checked(self.tables[name], name)
        self.neurons = self.tables["neurons"]
        self.features = list(dict.fromkeys(self.neurons["feature"])) if self.neurons is not None else []
        self.docs, self.steps = Documents(self.run.documents), len(self.run)
        self.word, self.axis = step_word(self.run), axis_name(self.run)
        self._newest = [self]             # shared by every RunData that succeeds this one (``current``)

    def current(self) -> "RunData":
        """What a new session shows: the newest RunData while the Run on disk is still the one it
        holds, else the Run now there, opened whole (sessions already open keep the one they have).
        A Run that is gone or cannot be opened is one line."""
        newest = self._newest[0]
        if same(newest.run.path, newest.seen):
            return newest
        try:
            fresh = RunData(newest.run.path, newest.window)
        except RnnscopeError as err:
            raise RnnscopeError(f"the Run being served changed on disk and cannot be opened now: {err.problem}",
                                "reload once it is written again, or restart `rnnscope serve`") from None
        fresh._newest = self._newest
        self._newest[0] = fresh
        return fresh

    def span(self, sel: Selection) -> tuple[int, int]:
        """The selected page: steps ``[s, e)`` inside the selected document."""
        return page(self.docs, sel.document, sel.start, self.window)

    def at(self, step: int) -> dict:
        """The selection fields for a page starting at ``step`` (its document follows it)."""
        step = int(min(max(step, 0), self.steps - 1))
        return {"start": step, "document": self.docs.of(step)}

    def turn(self, sel: Selection, way: int) -> dict:
        """The next (``way`` +1) or previous (-1) page: within the document, then on into the next one."""
        s, e = self.span(sel)
        d, first = sel.document, int(self.docs.step_start[sel.document])
        if way > 0:
            return self.at(e) if e < self.steps else self.at(s)
        if s > first:
            return self.at(max(first, s - self.window))
        if d == 0:
            return self.at(s)
        return self.at(max(int(self.docs.step_start[d - 1]), int(self.docs.step_end[d - 1]) - self.window))

    def unit(self, unit) -> tuple[str, int] | None:
        """``(key, index)`` for a unit named in a table, or None when the Run has no such unit."""
        key, _, index = str(unit).rpartition(":")
        if key in self.units and index.isdigit() and int(index) < self.units[key]:
            return key, int(index)
        return None

    def first_selection(self) -> Selection:
        """The strongest unit of the neuron table, else unit 0 of the last cell-state key."""
        feature = self.features[0] if self.features else None
        if self.neurons is not None:
            for unit in self.neurons.dropna(subset=["strength"])["unit"]:
                if self.unit(unit):
                    return Selection(*self.unit(unit), 0, feature)
        cells = [k for k in self.state_keys if k.endswith(".c")] or self.state_keys or self.grad_keys
        return Selection(cells[-1], 0, 0, feature)


class Page:
    """One session's dashboard: the selection, the tabs (``tabs.open_all()`` builds any left) and,
    when asked for, how long each part took to build (``timings``: name -> seconds)."""

    def __init__(self, sel: Selection, tabs: LazyTabs, timings: dict):
        self.sel, self.tabs, self.timings = sel, tabs, timings


def build(doc, data: RunData, *, defer: bool | None = None, timings: dict | None = None) -> Page:
    """Every view over one fresh selection, added to ``doc``: the controls, the text and the open tab
    at once; the other tabs on first use or after the first paint (``tabs.LazyTabs``). ``defer``:
    whether to wait with them (default: when a browser session waits on the page, not when the
    server checks a Run at start, which builds every view so that a Run it cannot show is refused)."""
    defer = doc.session_context is not None if defer is None else defer
    clock = {} if timings is None else timings

    def timed(name, make):
        t = time.perf_counter()
        made = make()
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - t
        return made
    sel = timed("selection", data.first_selection)
    text = timed("text view", lambda: (LineView if data.run.frames else TextView)(data, sel))   # frames: no text
    controls = timed("controls", lambda: Controls(data, sel))
    # title: (build the view, whether it is cheap enough for the first paint: a note that the data is
    # missing, or pattern search's table, empty until a span is selected)
    makers = {"heatmap": (lambda: HeatmapView(data, sel), False),
              "neurons": (lambda: NeuronView(data, sel), data.neurons is None),
              "top contexts": (lambda: ContextsView(data, sel), data.tables.get("contexts") is None),
              "gradient flow": (lambda: GradientView(data, sel), not data.grad_keys),
              "gate saturation": (lambda: SaturationView(data, sel), data.tables.get("saturation") is None),
              "pattern search": (lambda: PatternView(data, sel, text), True)}
    if data.run.frames:                 # pattern search selects a span of text, which frames have none of
        del makers["pattern search"]
    if data.run.attention_names():      # a decoder's attention: its own tab, built on first use like the rest
        makers["attention"] = (lambda: AttentionView(data, sel), False)
    views = [(title, lambda title=title, make=make: timed(title, make), cheap)
             for title, (make, cheap) in makers.items()]
    tabs = LazyTabs(doc, views, defer=defer)
    doc.add_root(column(row(controls.root, text.info), text.plot, tabs.tabs, name="dashboard"))
    doc.title = f"rnnscope: {data.run.path.name}"
    return Page(sel, tabs, clock)


def make_document(doc, run, window: int = WINDOW):
    """One session's page, over the Run as it is on disk now (``RunData.current``). A failure shows
    one escaped line on the page (the traceback goes to the server's log only), never a traceback."""
    try:
        data = run.current() if isinstance(run, RunData) else RunData(run, window)
        return build(doc, data)
    except Exception as err:      # noqa: BLE001 -- whatever broke, the page says so in one line
        if not isinstance(err, RnnscopeError):
            log.error("dashboard page failed:\n%s", traceback.format_exc())
        problem = first_line(err, None)
        doc.clear()
        doc.add_root(div(f"<p>rnnscope: error: {esc(problem)}</p>", name="page_error", width=900))
        return None

