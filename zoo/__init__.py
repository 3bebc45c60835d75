"""Char-level RNN / LSTM / GRU models, the corpora they learn from, their trainer and checkpoints."""
if __name__ != "rnnscope.zoo":      # run from the repository root, ``import zoo`` finds this folder
    raise ImportError("this folder is rnnscope.zoo, not a top-level 'zoo' package: "
                      "use `from rnnscope import zoo` (pip install -e . first)")
from .checkpoint import Checkpoint, load, save, shipped
from .corpora import corpus
from rnnscope.errors import RnnscopeError
from .model import Architecture, CharModel, matched_hidden, parameter_count
from .vocab import Vocab

SAMPLES = __import__("pathlib").Path(__file__).parent / "samples"


def catalogue() -> list[dict]:
    """One row per shipped checkpoint: what ``rnnscope zoo list`` prints."""
    rows = []
    for name, path in shipped().items():
        card = load(f"zoo:{name}").card   # loading verifies the checksum: list only what works
        a = card["architecture"]
        rows.append({"name": name, "arch": a["arch"], "corpus": card["corpus"]["name"], "layers": a["layers"],
                     "hidden": a["hidden"], "params": card["params"], "val_loss": card["val_loss"],
                     "test_loss": card["test_loss"], "test_bpc": card["test_bpc"],
                     "chars_seen": card["training"]["chars_seen"]})
    return rows


__all__ = ["Architecture", "CharModel", "Checkpoint", "RnnscopeError", "Vocab", "catalogue", "corpus", "load",
           "matched_hidden", "parameter_count", "save", "shipped", "SAMPLES"]
