"""dashboards: the Bokeh server app over a Run (``rnnscope serve``) and heatmap export to PNG, SVG
and standalone HTML (``rnnscope export``). Names are imported on first use."""
if __name__ != "rnnscope.dashboards":      # run from the repository root, ``import dashboards`` finds this folder
    raise ImportError("this folder is rnnscope.dashboards, not a top-level 'dashboards' package: "
                      "use `from rnnscope import dashboards` (pip install -e . first)")
from rnnscope.lazy import exports

_API = {"feature_figure": "export", "top_units_for": "export", "unit_figure": "export", "units_figure": "export",
        "serve": "server"}
__all__ = sorted(_API)
__getattr__, __dir__ = exports(__name__, _API, globals())
