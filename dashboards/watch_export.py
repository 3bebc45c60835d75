"""A watch log's figures to one PNG (the same figures the live page draws, filled once):

    export_watch("runs/train", "train.png")                       # every view, the first key's heatmap
    export_watch("runs/train", "decay.png", key="rnn.l0.grad_c")
"""
from __future__ import annotations

from pathlib import Path

from bokeh.layouts import column

from rnnscope.errors import RnnscopeError
from rnnscope.store.watchlog import WatchLog, open_watch_log

from . import watch_data as wd
from .export import export
from .figures import plain
from .watch_figures import WatchViews


def _log(log) -> WatchLog:
    return log if isinstance(log, WatchLog) else open_watch_log(log)


def watch_figure(log, key: str | None = None, width: int = 800):
    """Loss, gradient norm, half-life per layer, the decay heatmap of ``key`` (default: the log's
    first key) and gate saturation, stacked against the training step."""
    log = _log(log)
    keys = wd.grad_keys(log.manifest)
    key = keys[0] if key is None and keys else key
    if key not in keys:
        raise RnnscopeError(f"the watch log has no key {str(key)[:60]!r}", f"use one of {', '.join(keys[:8])}")
    if not len(log.steps):
        raise RnnscopeError(f"the watch log {log.path} holds no watched steps yet",
                            "export once training has passed its first watched step")
    views = WatchViews(log.manifest, log.steps, log.decay, log.layers, key, width)
    views.heat.title.text = plain(f"{key}: gradient-decay norm (1 at lag 0) against lag and training step")
    figures = [*views.lines, views.heat, views.saturation]
    for fig in figures:
        fig.toolbar_location = None                    # a picture has no use for the tools
    return column(*figures)


def export_watch(log, out, key: str | None = None) -> Path:
    """Write the watch log's figures to ``out`` (a .png), atomically."""
    if Path(out).suffix.lower() != ".png":
        raise RnnscopeError(f"cannot export a watch log to {Path(out).suffix or 'a file without a suffix'}",
                            "name the output FILE.png")
    return export(watch_figure(log, key), out)
