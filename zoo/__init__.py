"""Char-level RNN / LSTM / GRU models, the corpora they learn from, their trainer and checkpoints.

The models, vocabulary, corpora and checkpoints sit low in the stack (they need no probe); the trainer
(``rnnscope.zoo.train``) sits above the probe, since it can watch a run. Names are imported on first use."""
if __name__ != "rnnscope.zoo":      # run from the repository root, ``import zoo`` finds this folder
    raise ImportError("this folder is rnnscope.zoo, not a top-level 'zoo' package: "
                      "use `from rnnscope import zoo` (pip install -e . first)")
from pathlib import Path

from rnnscope.lazy import exports

SAMPLES = Path(__file__).parent / "samples"

_API = {"Checkpoint": "checkpoint", "load": "checkpoint", "save": "checkpoint", "shipped": "checkpoint",
        "catalogue": "checkpoint", "corpus": "corpora", "RnnscopeError": "rnnscope.errors",
        "Architecture": "model", "CharModel": "model", "matched_hidden": "model", "parameter_count": "model",
        "Vocab": "vocab"}
__all__ = sorted([*_API, "SAMPLES"])
__getattr__, __dir__ = exports(__name__, _API, globals())
