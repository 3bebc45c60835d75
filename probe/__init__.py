"""probe: exact per-timestep states, gates and gradients of fused RNN / LSTM / GRU modules."""
if __name__ != "rnnscope.probe":      # run from the repository root, ``import probe`` finds this folder
    raise ImportError("this folder is rnnscope.probe, not a top-level 'probe' package: "
                      "use `from rnnscope import probe` (pip install -e . first)")
from .recorder import CallTrace, Probe, Trace
from .keys import parse_key, recurrent_modules, state_key

__all__ = ["CallTrace", "Probe", "Trace", "parse_key", "recurrent_modules", "state_key"]
from .recording import model_checksum, record  # noqa: E402
from .run import Run, open_run  # noqa: E402

__all__ += ["Run", "model_checksum", "open_run", "record"]
