"""Steering: sample from a language model with units clamped at every step, beside the unclamped
sample from the same random numbers.

Every (seed, clamped or not) pair is one row of a single batch, so all samples run together through
``Intervention`` (the edits are per-row masks). The two rows of a seed draw their next character from
the same uniform number each step (inverse-CDF sampling with common random numbers): where the clamp
does not change the model's distribution they write the same text, so any difference is the clamp's.
"""
from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rnnscope.errors import RnnscopeError
from rnnscope.probe import Probe, parse_key

from rnnscope.probe.intervention import Intervention


# a clamp holds a state; tanh(20) is 1 in float32, so a state of 1e6 already saturates every gate it
# feeds, and 1e308 overflowed float32 to inf (a RuntimeError, or NaN logits sampled as the last character)
CLAMP_LIMIT = 1e6
# the prime runs step by step under a clamp (the edit changes the recurrence at every step): 6 steps a
# millisecond for a 16-unit LSTM, so a 128 KB prime took 21 s before the first character, and a model fed
# its whole prefix each step pays that at every character; a prime is a context, not a corpus
PRIME_LIMIT = 10_000


def parse_clamp(spec: str) -> tuple[str, float]:
    """``'rnn.l0.c:199=2.5' -> ('rnn.l0.c:199', 2.5)``."""
    unit, eq, value = spec.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not eq or not unit or not np.isfinite(number):
        raise RnnscopeError(f"{spec!r} is not a clamp", "write clamps as KEY:INDEX=VALUE, e.g. rnn.l0.c:199=2.5")
    return unit, clamp_value(unit, number)


def clamp_value(unit: str, value) -> float:
    """``value`` as the float a unit is held at, refused unless a finite number within ``CLAMP_LIMIT``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not np.isfinite(value) or abs(value) > CLAMP_LIMIT:
        raise RnnscopeError(f"the clamp {str(unit)[:80]}={str(value)[:40]} is not a finite number within "
                            f"±{CLAMP_LIMIT:.0e}", "clamp a unit to a value a state can hold, e.g. -3 or 2.5")
    return float(value)


def _widths(model, ids: torch.Tensor, keys: set[str]) -> dict[str, int]:
    """Units per key, from a one-step dry run; unknown keys are refused with the ones the model has."""
    with torch.no_grad(), Probe(model) as p:
        model(ids[:, :1])
        have = {k: p.trace[k].shape[-1] for k in p.trace}
    missing = sorted(keys - set(have))
    if missing:
        raise RnnscopeError(f"the model has no state {missing[0]!r}",
                            f"clamp one of {', '.join(list(have)[:8])}{', ...' if len(have) > 8 else ''}")
    return have


def _edits(clamps: dict[str, float], widths: dict[str, int], rows: int) -> dict:
    """``{key: (mask [rows, units], value [rows, units])}``, the clamps applied to the odd rows."""
    edits = {}
    for unit, value in clamps.items():
        key, _, index = unit.rpartition(":")
        parse_key(key)
        if not index.isascii() or not index.isdigit() or int(index) >= widths[key]:
            raise RnnscopeError(f"{unit}: {key} has {widths[key]} units", f"use an index from 0 to {widths[key] - 1}")
        value = clamp_value(unit, value)
        mask, fill = edits.get(key, (torch.zeros(rows, widths[key], dtype=torch.bool), torch.zeros(rows, widths[key])))
        mask[1::2, int(index)] = True
        fill[1::2, int(index)] = value
        edits[key] = (mask, fill)
    return edits


def _stateful(model) -> bool:
    """A model that takes and returns its recurrent state (``model(ids, state, return_state=True)``, as the
    zoo's do) is fed one character a step; any other is fed the whole prefix each step."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "state" in params and "return_state" in params


def _logits(output, vocab_size: int) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[-1] != vocab_size:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RnnscopeError(f"the model's output is {shape}, not next-character logits [batch, time, "
                            f"{vocab_size}]", "generate needs a language model over the checkpoint's vocabulary")
    return logits[:, -1].float()


def generate(model, vocab, prime: str, length: int, *, clamps: dict[str, float] | None = None,
             seeds=(0,), temperature: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """Sample ``length`` characters after ``prime`` for each seed, without and with ``clamps``
    (``{'rnn.l0.c:199': 2.5}``: the unit held at that value at every step, prime included).

    Returns one row per (seed, clamped): ``seed, clamped, text`` (the generated characters only).
    ``temperature`` 0 takes the most likely character.
    """
    if length < 1:
        raise RnnscopeError(f"length must be at least 1 (got {length})", "pass --length N")
    if temperature < 0 or not np.isfinite(temperature):
        raise RnnscopeError(f"temperature must be 0 or more (got {temperature})", "pass e.g. --temperature 0.8")
    if len(prime) > PRIME_LIMIT:
        raise RnnscopeError(f"the prime is {len(prime):,} characters, more than a prime can be (at most "
                            f"{PRIME_LIMIT:,}: it runs step by step before the first character)",
                            "start from the last part of it (--prime)")
    ids = vocab.encode(prime)
    seeds = list(seeds)
    rows = 2 * len(seeds)
    clamps = dict(clamps or {})
    keys = {u.rpartition(":")[0] for u in clamps}
    edits = _edits(clamps, _widths(model, ids, keys), rows) if clamps else {}
    uniforms = np.stack([np.random.default_rng(s).random(length) for s in seeds]).repeat(2, 0)   # [rows, length]
    stateful = _stateful(model)
    was = model.training
    model.eval()
    seq = ids.expand(rows, -1).clone()
    out = torch.empty(rows, length, dtype=torch.long)
    try:
        with torch.no_grad(), Intervention(model, edits):
            step_in, state = seq, None
            for t in tqdm(range(length), desc="generate", unit="ch", disable=not progress):
                if stateful:
                    output, state = model(step_in, state, return_state=True)
                else:
                    output = model(torch.cat([seq, out[:, :t]], 1))
                logits = _logits(output, len(vocab))
                if not torch.isfinite(logits).all():        # softmax of NaN would sample the last character
                    raise RnnscopeError(f"the model's next-character logits are not finite at character {t}",
                                        "check the checkpoint's weights, or clamp to a smaller value")
                if temperature == 0:
                    nxt = logits.argmax(-1)
                else:
                    cdf = torch.softmax(logits / temperature, -1).double().cumsum(-1)
                    u = torch.as_tensor(uniforms[:, t]).unsqueeze(-1) * cdf[:, -1:]
                    nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(len(vocab) - 1)
                out[:, t] = nxt
                step_in = nxt.unsqueeze(-1)
    finally:
        model.train(was)
    return pd.DataFrame({"seed": np.repeat(seeds, 2), "clamped": [False, True] * len(seeds),
                         "text": [vocab.decode(r) for r in out]})


def feature_share(frame: pd.DataFrame, prime: str, feature) -> pd.DataFrame:
    """Adds ``share``: the fraction of each sample's generated characters where ``feature(text) -> [time]``
    (computed over prime + sample, so a comment opened in the prime counts) is on."""
    shares = []
    for text in frame["text"]:
        values = np.asarray(feature(prime + text), float)[len(prime):]
        shares.append(float(values.mean()) if len(values) else np.nan)
    return frame.assign(share=shares)


def measured(feature: str, language: str | None):
    """``text -> [chars]`` of a built-in feature, quietly (a sample without comments is constant)."""
    import warnings

    from . import features

    def values(text):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return features.compute(text, [feature], language)[feature].to_numpy()
    return values


def generation_report(frame: pd.DataFrame, prime: str, clamps: dict, measure: str | None, length: int) -> list[str]:
    """What ``rnnscope generate`` prints: each seed's samples (clamped beside unclamped), escaped for
    the terminal, and with ``measure`` the share of generated characters in the feature, clamped
    against unclamped over the seeds."""
    from rnnscope.errors import escaped
    lines = []
    for seed, pair in frame.groupby("seed", sort=False):
        for _, r in pair.iterrows():
            if r["clamped"] or clamps:
                label = f"clamped {', '.join(f'{u}={v:g}' for u, v in clamps.items())}" if r["clamped"] else "unclamped"
                share = f"; {measure} {r['share']:.1%}" if measure else ""
                lines += [f"--- seed {seed}, {label}{share}", escaped(prime + r["text"], keep="\n\t", limit=None)]
    if measure:
        seeds = frame["seed"].nunique()
        t = frame.groupby("clamped")["share"].agg(["mean", "std", "min", "max"])
        lines += [f"\nshare of generated characters in {measure} over {seeds} seeds ({length} characters each):",
                  t.rename(index={False: "unclamped", True: "clamped"}).to_string(float_format=lambda v: f"{v:.3f}")]
        if clamps and seeds > 1:
            d = frame[frame.clamped]["share"].to_numpy() - frame[~frame.clamped]["share"].to_numpy()
            lines.append(f"clamped - unclamped: {d.mean():+.3f} (seeds where clamped is higher: "
                         f"{int((d > 0).sum())}/{len(d)}, lower: {int((d < 0).sum())})")
    return lines
