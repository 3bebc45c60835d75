"""``record``: stream a text of any length through a model and write every state into a Run.

The text is fed in chunks as one sequence (each recurrent module's state is carried from chunk to
chunk, so values equal a single pass). Memory is bounded by the chunk; rows are appended to
``.npy`` files with pwrite (read back memory-mapped).

Gradients (``grad=True``) are derivatives of the summed next-character loss. Each chunk is run
``horizon`` steps past its end and the state is then rewound to the chunk's end, so the gradient
at step t includes every loss from t to at least t + ``horizon``. Losses before t cannot depend
on the state at t, so with ``horizon >= len(text)`` the gradients equal those of a single pass.
"""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from numba import njit
from tqdm import tqdm

from rnnscope.errors import RnnscopeError
from rnnscope.store import DTYPES, RunWriter, check_out, open_run, split_key
from rnnscope.store.writer import text_bytes
from rnnscope.zoo.checkpoint import Checkpoint

from .keys import KINDS, family
from .recorder import Probe
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
OVERFLOW = {"float16": 65520.0, "float32": np.inf}    # |x| from which the stored value is Inf


def model_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _logits(output) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != 1:
        raise RnnscopeError("the model's output is not logits [1, time, vocab]",
                            "pass loss=fn(output, targets) -> per-step loss [time]")
    return logits


def _next_char_loss(output, targets: torch.Tensor) -> torch.Tensor:
    logits = _logits(output)[0, : len(targets)]
    return F.cross_entropy(logits.float(), targets, reduction="none")


@njit(cache=True, boundscheck=False)
def _accumulate(a, n, s, ss, lo, hi, limit):
    """One pass over ``a [rows, units]`` (float32, any strides): per unit, the count, sum and sum of
    squares (float64), min and max of the finite values. Returns the number of NaN/Inf values and
    of finite ones at or beyond ``limit`` in magnitude (those float16 stores as Inf)."""
    rows, units = a.shape
    bad, over = 0, 0
    for r in range(rows):
        for j in range(units):
            v = a[r, j]
            if np.isfinite(v):
                x = np.float64(v)
                n[j] += 1.0
                s[j] += x
                ss[j] += x * x
                lo[j] = min(lo[j], v)
                hi[j] = max(hi[j], v)
                if abs(v) >= limit:
                    over += 1
            else:
                bad += 1
    return bad, over


class _UnitStats:
    """Running per-unit count, mean, spread, min and max over time, NaN and Inf left out, in one
    compiled pass per chunk (torch's column reductions over the gates' strided rows cost more
    than the probe's forward)."""

    def __init__(self, units: int):
        self.n, self.s, self.ss = np.zeros(units), np.zeros(units), np.zeros(units)
        self.lo, self.hi = np.full(units, np.inf), np.full(units, -np.inf)

    def add(self, a: np.ndarray, limit: float) -> tuple[int, int]:
        """``a [rows, units]`` float32; returns ``(nonfinite, beyond limit)`` counts."""
        return _accumulate(a, self.n, self.s, self.ss, self.lo, self.hi, limit)

    def frame(self, key: str) -> pd.DataFrame:
        seen = self.n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(seen, self.s / self.n, np.nan)
            var = np.maximum(self.ss / self.n - mean ** 2, 0)
        parts = split_key(key)
        return pd.DataFrame({"unit": [f"{key}:{i}" for i in range(len(mean))], "key": key,
                             "index": np.arange(len(mean)), "module": parts["module"], "layer": parts["layer"],
                             "reverse": parts["reverse"], "kind": parts["kind"], "mean": mean,
                             "std": np.where(seen, np.sqrt(var), np.nan),
                             "min": np.where(seen, self.lo, np.nan), "max": np.where(seen, self.hi, np.nan)})


def _identity(model, mods: dict, card: dict, source: str) -> dict:
    """The manifest's ``model``: where it came from, its checksum, and each recurrent module's shape."""
    def text_or_none(v):        # a card is someone else's JSON: only strings go into the manifest
        return v if isinstance(v, str) else None
    return {"source": str(source), "class": type(model).__name__, "checksum": model_checksum(model),
            "card_name": text_or_none(card.get("name")), "weights_sha256": text_or_none(card.get("weights_sha256")),
            "modules": {n: {"type": family(m), "layers": m.num_layers, "hidden": m.hidden_size,
                            "bidirectional": m.bidirectional, "proj_size": getattr(m, "proj_size", 0)}
                        for n, m in mods.items()}}


def _layout(model, ids, grad, kinds) -> dict[str, int]:
    """Key -> units, from a one-step dry run."""
    with Probe(model, grad=grad, kinds=kinds, param_grads=False) as p:
        out = model(ids[:, :1])
        if grad:
            _logits(out).sum().backward()
        return {k: p.trace[k].shape[-1] for k in p.trace}


def _stream(model, ids, w: RunWriter, layout: dict[str, int], *, grad, chunk, horizon, kinds, loss, dtype,
            progress):
    """The streaming loop: chunk by chunk, the state carried, each chunk's rows written to ``w``.
    Returns per-key running statistics and NaN/Inf/overflow counts."""
    T = ids.shape[1]
    arrays = {k: w.states(k, u) for k, u in layout.items()}
    losses = w.loss()
    stats = {k: _UnitStats(u) for k, u in layout.items()}
    bad = {k: {"nonfinite": 0, "overflow": 0} for k in layout}
    targets_all = ids[0, 1:]
    with tqdm(total=T, unit="ch", unit_scale=True, desc="probe", disable=not progress, mininterval=0.5) as bar, \
            Probe(model, grad=grad, kinds=kinds, carry=True, param_grads=False) as p:
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            ahead = min(T, e + horizon) if grad else e      # read ahead: the gradient's horizon
            with torch.set_grad_enabled(grad):
                output = model(ids[:, s:ahead])
                targets = targets_all[s:ahead]
                step_loss = loss(output, targets) if loss else _next_char_loss(output, targets)
                if grad and len(step_loss):
                    step_loss.sum().backward()
            if ahead > e:
                p.carry_from(e - s - 1)                     # the next chunk starts where this one ends
            chunk_loss = np.full(e - s, np.nan, np.float32)
            kept = step_loss.detach()[: e - s]
            chunk_loss[: len(kept)] = kept.numpy()
            losses.write(s, chunk_loss)
            for k in layout:
                a = p.trace[k][0, : e - s].detach()
                arrays[k].write(s, a.to(TORCH_DTYPES[dtype]).numpy())    # torch's F16C conversion
                nonfinite, overflow = stats[k].add(a.numpy(), OVERFLOW[dtype])
                bad[k]["nonfinite"] += nonfinite
                bad[k]["overflow"] += overflow
            p.calls.clear()      # bounded memory: this chunk is on disk
            bar.update(e - s)
    return stats, bad


def record(model, text: str, out, *, encode=None, grad: bool = False, chunk: int = 2048, horizon: int = 512,
           kinds=None,
           dtype: str = "float16", overwrite: bool = False, unk: str | None = None, loss=None,
           progress: bool = True, source: str = ""):
    """Probe ``model`` over ``text`` and write a Run to ``out``; returns the opened Run.

    ``model`` is a ``zoo.Checkpoint`` (its vocabulary encodes the text) or any ``nn.Module``
    taking ``ids [1, time]`` with ``encode: str -> LongTensor[1, time]`` given. ``loss(output,
    targets) -> [time]`` overrides next-character cross-entropy on ``output`` logits.
    """
    out = Path(out)
    vocab, card = None, {}
    if isinstance(model, Checkpoint):
        vocab, card, source = model.vocab, model.card, source or f"zoo:{model.name}"
        encode = encode or (lambda s: vocab.encode(s, unk=unk))
        model = model.model
    if encode is None:
        raise RnnscopeError("no encoder for this model", "pass encode=fn(text) -> LongTensor[1, time]")
    if dtype not in DTYPES:
        raise RnnscopeError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if not text:
        raise RnnscopeError("the text is empty", "give a text of at least one character")
    if grad and len(text) < 2:      # the loss at a step is the next character's: one character has none
        raise RnnscopeError("gradients need at least two characters (a one-character text has no next-character "
                            "loss)", "give a longer text, or probe without --grad")
    if chunk < 1 or horizon < 0:
        raise RnnscopeError(f"chunk must be >= 1 and horizon >= 0 (got {chunk}, {horizon})", "fix --chunk/--horizon")
    check_out(out, overwrite)          # before the model runs: a bad --out costs nothing
    text_bytes(text)
    ids = encode(text)
    if ids.dim() != 2 or ids.shape != (1, len(text)):
        raise RnnscopeError(f"encode gave ids of shape {list(ids.shape)} for {len(text)} characters",
                            "encode must return LongTensor[1, time] with one id per character")
    mods = Probe(model).modules
    known = {k for m in mods.values() for k in KINDS[family(m)]}
    if kinds is not None and set(kinds) - known:
        raise RnnscopeError(f"unknown state kind(s) {', '.join(sorted(set(kinds) - known))} for this model",
                            f"choose from {', '.join(sorted(known))}")
    if any(m.bidirectional for m in mods.values()) and len(text) > chunk:   # (its future is in the next chunk)
        raise RnnscopeError("a bidirectional module reads the text backwards too, so it cannot be streamed in chunks",
                            f"pass --chunk {len(text)} (or more) to probe it in one pass")
    was_training = model.training
    model.eval()
    try:
        layout = _layout(model, ids, grad, kinds)
        for k in layout:                # a module name the store cannot hold as a file name is refused here
            try:
                split_key(k)
            except RnnscopeError:
                raise RnnscopeError(f"the state key {k[:80]!r} cannot name a file in a Run",
                                    "name recurrent submodules with letters, digits and _ only") from None
        itemsize, T = np.dtype(DTYPES[dtype]).itemsize, len(text)
        need = T * sum(layout.values()) * itemsize + T * 4 + len(text.encode())
        free = shutil.disk_usage(out.resolve().parent if out.resolve().parent.exists() else Path.cwd()).free
        print(f"probe: {len(layout)} keys, {sum(layout.values()):,} units x {T:,} steps in {dtype}: "
              f"{need / 1e6:,.1f} MB ({sum(layout.values()) * itemsize / 1e3:.1f} KB per character)")
        if need * 1.05 > free:
            raise RnnscopeError(f"the run needs {need / 1e9:.2f} GB but {out.parent} has {free / 1e9:.2f} GB free",
                                "record fewer --kinds, use --dtype float16, a shorter text, or another disk")
        with RunWriter(out, text, ids=ids[0].numpy(), dtype=dtype, overwrite=overwrite) as w:
            stats, bad = _stream(model, ids, w, layout, grad=grad, chunk=chunk, horizon=horizon, kinds=kinds,
                                 loss=loss, dtype=dtype, progress=progress)
            w.units(pd.concat([stats[k].frame(k) for k in layout], ignore_index=True))
            with warnings.catch_warnings():       # all NaN (a model producing NaN): the mean is NaN, said below
                warnings.simplefilter("ignore", RuntimeWarning)
                mean_loss = float(np.nanmean(w.read_loss())) if T > 1 else float("nan")
            flagged = {k: v for k, v in bad.items() if v["nonfinite"] or v["overflow"]}
            for k, v in flagged.items():
                print(f"probe: warning: {k} has {v['nonfinite']} NaN/Inf values and {v['overflow']} that overflow "
                      f"{dtype}; flagged in the manifest")
            w.commit({
                "model": _identity(model, mods, card, source),
                "vocab": vocab.chars if vocab else None, "unk": unk,
                "kinds": sorted({split_key(k)["kind"] for k in layout}), "grad": grad, "chunk": chunk,
                "grad_horizon": horizon if grad else None,
                "loss": {"kind": "user" if loss else "next-token", "mean_nats": mean_loss,
                         "bits_per_char": mean_loss / np.log(2)},
                "keys": {k: {"units": u, **bad[k]} for k, u in layout.items()},
                "nonfinite": bool(flagged),
            })
    except KeyboardInterrupt:
        raise RnnscopeError(f"interrupted: no run was written to {out}", "run the probe again") from None
    finally:
        model.train(was_training)
    return open_run(out)
