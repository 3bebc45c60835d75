"""analysis: what units track, how surely, and whether they matter.

Every function reads a Run (or an in-memory trace with its text) and returns a pandas DataFrame:
``features`` (per-character tracks), ``find_neurons`` / ``sparse_probe`` (which units track a
feature), ``ablate`` (edit units in the real forward pass), ``gate_saturation``,
``gradient_norms`` / ``gradient_decay`` (gradient flow through time). Names are imported on first use.
"""
if __name__ != "rnnscope.analysis":      # run from the repository root, ``import analysis`` finds this folder
    raise ImportError("this folder is rnnscope.analysis, not a top-level 'analysis' package: "
                      "use `from rnnscope import analysis` (pip install -e . first)")
from rnnscope.lazy import exports

_API = {"features": "features", "find_neurons": "neurons", "analyze": "report", "top_units": "neurons", "benjamini_hochberg": "neurons",
        "Intervention": "intervene", "ablate": "intervene", "position_mask": "intervene"}
__all__ = sorted(_API)
__getattr__, __dir__ = exports(__name__, _API, globals())
