"""rnnscope: look inside trained recurrent networks.

    import rnnscope as rs
    ck = rs.load("zoo:lstm-linux")                 # a Checkpoint: .model, .vocab, .card, .name
    me = rs.load("mine.py:build")                  # any model: a Subject (.model, .encoder, .loss); see probe.specs
    with rs.Probe(ck.model, grad=True) as p: ...   # every state, gate and gradient in memory
    run = rs.record(ck, text, "runs/x")            # the same, streamed into a Run on disk
    run = rs.open_run("runs/x"); rs.find_neurons(run)
    rs.analyze(run, own={"vowel": fn})             # every table, your features too, written into the Run
    rs.show(run, "rnn.l0.c:199")                   # in Jupyter: the text coloured by that unit, inline

The subpackages are ``rnnscope.probe``, ``rnnscope.analysis``, ``rnnscope.dashboards`` and
``rnnscope.zoo``; the command line lives in ``rnnscope.cli``. Names are imported on first use, so
``import rnnscope`` stays cheap and the bottom layer (``rnnscope.errors``) imports nothing above it.
"""
from __future__ import annotations

from rnnscope.lazy import exports

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "RnnscopeError": "rnnscope.errors",
    "load": "rnnscope.probe.specs", "Checkpoint": "rnnscope.zoo", "Subject": "rnnscope.probe.subject",
    "Probe": "rnnscope.probe", "cell": "rnnscope.probe", "record": "rnnscope.probe", "open_run": "rnnscope.store", "Run": "rnnscope.store",
    "find_neurons": "rnnscope.analysis", "analyze": "rnnscope.analysis.report", "ablate": "rnnscope.analysis", "Intervention": "rnnscope.probe",
    "position_mask": "rnnscope.analysis", "features": "rnnscope.analysis",
    "show": "rnnscope.dashboards.notebook",
    "Watch": "rnnscope.probe.watch",
}
__all__ = sorted(_API)
_API.update({name: f"rnnscope.{name}" for name in ("probe", "analysis", "dashboards", "zoo", "store")})
__getattr__, __dir__ = exports(__name__, _API, globals())
