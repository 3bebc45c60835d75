"""probe: exact per-timestep states, gates and gradients of fused RNN / LSTM / GRU modules and of cells in step loops."""
if __name__ != "rnnscope.probe":      # run from the repository root, ``import probe`` finds this folder
    raise ImportError("this folder is rnnscope.probe, not a top-level 'probe' package: "
                      "use `from rnnscope import probe` (pip install -e . first)")
from .recorder import CallTrace, Probe, Trace
from .cells import CellCall, cell, cell_modules
from .keys import parse_key, recurrent_modules, state_key

__all__ = ["CallTrace", "CellCall", "Probe", "Trace", "cell", "cell_modules", "parse_key", "recurrent_modules",
           "state_key"]
from .corpus import Documents, read_documents  # noqa: E402
from .encoders import Encoder, as_encoder  # noqa: E402
from .recording import model_checksum, record  # noqa: E402
from .run import Run, open_run  # noqa: E402
from .subject import Subject, subject_of  # noqa: E402

__all__ += ["Documents", "Encoder", "Run", "Subject", "as_encoder", "model_checksum", "open_run", "read_documents",
            "record", "subject_of"]
