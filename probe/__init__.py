"""probe: exact per-timestep states, gates and gradients of recurrent modules and step-loop cells,
and the forward pass they run in: ``Probe`` (record), ``Intervention`` (edit), ``record`` (into a
Run), ``Watch`` (while training). Names are imported on first use."""
if __name__ != "rnnscope.probe":      # run from the repository root, ``import probe`` finds this folder
    raise ImportError("this folder is rnnscope.probe, not a top-level 'probe' package: "
                      "use `from rnnscope import probe` (pip install -e . first)")
from rnnscope.lazy import exports

_API = {
    "CallTrace": "probe", "Probe": "probe", "Trace": "probe",
    "CellCall": "cells", "cell": "cells", "cell_modules": "cells", "Attention": "attention",
    "parse_key": "keys", "recurrent_modules": "keys", "state_key": "keys",
    "Documents": "corpus", "read_documents": "corpus", "Encoder": "encoders", "as_encoder": "encoders",
    "model_checksum": "recording", "record": "recording", "Subject": "subject", "subject_of": "subject",
    "Intervention": "intervention", "Run": "rnnscope.store.run", "open_run": "rnnscope.store.run",
}
__all__ = sorted(_API)
for _m in ("adjoint", "attention", "autograd", "cells", "corpus",
           "encoders", "engine", "families", "gemm", "intervention", "keys", "packed",
           "probe", "recording", "replay", "specs", "scan", "steploss", "subject", "torchscript", "watch", "workspace"):
    _API.setdefault(_m, _m)        # ``from rnnscope.probe import replay`` keeps working
__getattr__, __dir__ = exports(__name__, _API, globals())
