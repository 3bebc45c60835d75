"""dashboards: the Bokeh server app over a Run (``rnnscope serve``) and heatmap export to PNG, SVG
and standalone HTML (``rnnscope export``)."""
if __name__ != "rnnscope.dashboards":      # run from the repository root, ``import dashboards`` finds this folder
    raise ImportError("this folder is rnnscope.dashboards, not a top-level 'dashboards' package: "
                      "use `from rnnscope import dashboards` (pip install -e . first)")
from .export import export, feature_figure, top_units_for, unit_figure, units_figure

__all__ = ["export", "feature_figure", "top_units_for", "unit_figure", "units_figure", "serve"]


def serve(*args, **kwargs):
    from .server import serve as _serve
    return _serve(*args, **kwargs)
