"""probe: exact per-timestep states, gates and gradients of fused RNN / LSTM / GRU modules."""
from .recorder import CallTrace, Probe, Trace
from .keys import parse_key, recurrent_modules, state_key

__all__ = ["CallTrace", "Probe", "Trace", "parse_key", "recurrent_modules", "state_key"]
from .recording import model_checksum, record  # noqa: E402
from .run import Run, open_run  # noqa: E402

__all__ += ["Run", "model_checksum", "open_run", "record"]
