"""probe: exact per-timestep states, gates and gradients of fused RNN / LSTM / GRU modules."""
from .hooks import CallTrace, Probe, Trace
from .keys import parse_key, recurrent_modules, state_key

__all__ = ["CallTrace", "Probe", "Trace", "parse_key", "recurrent_modules", "state_key"]
