"""The dashboard: one Bokeh document per browser session, built from a Run and its analysis tables.

Views over one selection (``state.Selection``: unit, page of steps, feature, document): the text
coloured by the selected unit, one step's span (a character, subword or word) at a time; the unit picker; the neuron table (click a row to show its unit); a
units x time heatmap of the page; gradient flow (per-step norms of the page, the decay curve); gate
saturation (the paper's scatter); pattern search (select a span of text, get the units on inside it
and off around it). Controls change the selection; each view updates its own ``ColumnDataSource``;
no figure is rebuilt after the first paint.
"""
from __future__ import annotations

import logging
import traceback

from bokeh.layouts import column, row
from bokeh.models import TabPanel, Tabs

from rnnscope.store import open_run, parse_key, read_table

from rnnscope.errors import RnnscopeError, first_line

from .plots import GradientView, SaturationView
from .queries import axis_name, checked, esc, step_word
from .state import Selection
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
        self.run = open_run(run_path)
        self.window, self.text, self.keys = window, self.run.text, self.run.keys()
        if not self.keys:
            raise RnnscopeError(f"{self.run.path} holds no recorded keys", "probe again with some --kinds")
        self.state_keys = [k for k in self.keys if not parse_key(k)["kind"].startswith("grad_")]
        self.grad_keys = [k for k in self.keys if parse_key(k)["kind"].startswith("grad_")]
        self.units = {k: int(self.run[k].shape[1]) for k in self.keys}
        self.tables, self.why = {}, {}
        for name in TABLES:
            self.tables[name], self.why[name] = checked(read_table(self.run, name), name)
        self.neurons = self.tables["neurons"]
        self.features = list(dict.fromkeys(self.neurons["feature"])) if self.neurons is not None else []
        self.docs, self.steps = Documents(self.run.documents), len(self.run)
        self.word, self.axis = step_word(self.run), axis_name(self.run)

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


def build(doc, data: RunData):
    """Every view over one fresh selection, added to ``doc``."""
    sel = data.first_selection()
    controls, text = Controls(data, sel), TextView(data, sel)
    views = [("heatmap", HeatmapView(data, sel)), ("neurons", NeuronView(data, sel)),
             ("top contexts", ContextsView(data, sel)),
             ("gradient flow", GradientView(data, sel)), ("gate saturation", SaturationView(data, sel)),
             ("pattern search", PatternView(data, sel, text))]
    tabs = Tabs(tabs=[TabPanel(child=v.root, title=t) for t, v in views], name="views")
    doc.add_root(column(row(controls.root, text.info), text.plot, tabs, name="dashboard"))
    doc.title = f"rnnscope: {data.run.path.name}"
    return sel


def make_document(doc, run, window: int = WINDOW):
    """One session's page. A failure shows one escaped line on the page (the traceback goes to the
    server's log only), never a traceback page."""
    try:
        data = run if isinstance(run, RunData) else RunData(run, window)
        return build(doc, data)
    except Exception as err:      # noqa: BLE001 -- whatever broke, the page says so in one line
        if not isinstance(err, RnnscopeError):
            log.error("dashboard page failed:\n%s", traceback.format_exc())
        problem = first_line(err, None)
        doc.clear()
        doc.add_root(div(f"<p>rnnscope: error: {esc(problem)}</p>", name="page_error", width=900))
        return None

