"""Tabs whose views are built on first use, so the first paint carries only what it shows.

Every view of the dashboard reads the Run and adds models the browser must lay out (a neuron table
of 2,000 rows, a scatter per layer of every gate unit); built before the first paint, the views no
one has opened yet cost a second of it. Here the open tab is built at once, a view with no data at
once (it is one Div that says which command makes the data), and every other view when its tab is
first opened or once the page reports it has drawn (Bokeh's ``DocumentReady``), whichever comes
first: by the time someone clicks a tab it is usually there.
"""
from __future__ import annotations

from bokeh.events import DocumentReady
from bokeh.models import TabPanel, Tabs

from .views import div

WAIT = "<p>building this view&hellip;</p>"


class LazyTabs:
    """``views``: ``(title, make, ready)`` per tab, where ``make()`` builds the view (an object with a
    ``root`` model) and ``ready`` says it is cheap to build now. ``defer=False`` builds every view at
    once (a document no browser waits on: the server's check at start, an exporter, a test)."""

    def __init__(self, doc, views, *, defer: bool = True, name: str = "views"):
        self.makers = [make for _, make, _ in views]
        self.built: list = [None] * len(views)
        panels = [TabPanel(child=div(WAIT, width=900), title=title) for title, _, _ in views]
        self.tabs = Tabs(tabs=panels, name=name)
        for i, (_, _, ready) in enumerate(views):
            if i == 0 or ready or not defer:
                self.open(i)
        self.tabs.on_change("active", lambda attr, old, new: self.open(new))
        if defer:
            doc.on_event(DocumentReady, lambda event: doc.add_next_tick_callback(self.open_all))

    def open(self, i: int) -> None:
        """Build tab ``i``'s view unless it is built; the tabs are tagged "built" once all are."""
        if 0 <= i < len(self.built) and self.built[i] is None:
            self.built[i] = self.makers[i]()
            self.tabs.tabs[i].child = self.built[i].root
            if all(v is not None for v in self.built):
                self.tabs.tags = ["built"]

    def open_all(self) -> None:
        for i in range(len(self.built)):
            self.open(i)
