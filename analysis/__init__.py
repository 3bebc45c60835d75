"""analysis: what units track. Feature tracks today (``analysis.features``); neuron search,
saturation, gradient flow and interventions are to come (issue 4)."""
from . import features

__all__ = ["features"]
