"""analysis: what units track, how surely, and whether they matter.

Every function reads a Run (or an in-memory trace with its text) and returns a pandas DataFrame:
``features`` (per-character tracks), ``find_neurons`` / ``sparse_probe`` (which units track a
feature), ``ablate`` / ``Intervention`` (edit units in the real forward pass), ``gate_saturation``,
``gradient_norms`` / ``gradient_decay`` (gradient flow through time).
"""
if __name__ != "rnnscope.analysis":      # run from the repository root, ``import analysis`` finds this folder
    raise ImportError("this folder is rnnscope.analysis, not a top-level 'analysis' package: "
                      "use `from rnnscope import analysis` (pip install -e . first)")
from . import features
from .intervene import Intervention, ablate, position_mask
from .neurons import benjamini_hochberg, find_neurons, top_units

__all__ = ["features", "find_neurons", "top_units", "benjamini_hochberg", "Intervention", "ablate",
           "position_mask"]
