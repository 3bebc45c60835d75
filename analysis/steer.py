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

from rnnscope.errors import RnnscopeError, escaped
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


def _widths(model, ids: torch.Tensor, keys: set[str], forward=None) -> dict[str, int]:
    """Units per key, from a one-step dry run (``forward(ids [1, 1])``, default the model itself);
    unknown keys are refused with the ones the model has."""
    with torch.no_grad(), Probe(model) as p:
        (forward or model)(ids[:, :1])
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


def _check_request(prime: str, length: int, temperature: float) -> None:
    if length < 1:
        raise RnnscopeError(f"length must be at least 1 (got {length})", "pass --length N")
    if temperature < 0 or not np.isfinite(temperature):
        raise RnnscopeError(f"temperature must be 0 or more (got {temperature})", "pass e.g. --temperature 0.8")
    if len(prime) > PRIME_LIMIT:
        raise RnnscopeError(f"the prime is {len(prime):,} characters, more than a prime can be (at most "
                            f"{PRIME_LIMIT:,}: it runs step by step before the first character)",
                            "start from the last part of it (--prime)")


def _finite(logits: torch.Tensor, t: int) -> torch.Tensor:
    if not torch.isfinite(logits).all():        # softmax of NaN would sample the last character
        raise RnnscopeError(f"the model's next-character logits are not finite at character {t}",
                            "check the model's weights, or clamp to a smaller value")
    return logits


def generate(model, vocab, prime: str, length: int, *, clamps: dict[str, float] | None = None,
             seeds=(0,), temperature: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """Sample ``length`` characters after ``prime`` for each seed, without and with ``clamps``
    (``{'rnn.l0.c:199': 2.5}``: the unit held at that value at every step, prime included).

    Returns one row per (seed, clamped): ``seed, clamped, text`` (the generated characters only) and
    ``ids`` (theirs, for ``record_generated``).
    ``temperature`` 0 takes the most likely character.
    """
    _check_request(prime, length, temperature)
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
                logits = _finite(_logits(output, len(vocab)), t)
                nxt = pick(logits, uniforms[:, t], temperature)
                out[:, t] = nxt
                step_in = nxt.unsqueeze(-1)
    finally:
        model.train(was)
    return pd.DataFrame({"seed": np.repeat(seeds, 2), "clamped": [False, True] * len(seeds),
                         "text": [vocab.decode(r) for r in out], "ids": [r.tolist() for r in out]})


# A user's model (``rnnscope generate --model SPEC``) is sampled through what its Subject already says:
# ``call(model, ids [1, T])`` must return next-token logits ``[1, T, V]`` (or a tuple whose first item
# is), and the encoder must decode: an object with ``decode(ids) -> str`` beside ``encode``, a
# ``str -> ids`` function with a ``decode`` attribute, or a zoo Vocab. Each sample runs alone (batch 1,
# the whole prefix each step), so the model sees exactly what ``record`` feeds it.
DECODE_FIX = ("give the encoder a decode(ids) -> str (a method beside encode, or an attribute of a str -> ids "
              "function: encode.decode = ...)")
LOGITS_FIX = "generate samples a language model or decoder whose call returns next-token logits [1, T, vocabulary]"


class SampledDocument(dict):
    """The document a call that takes one gets while ``generate`` samples: a name and a text, no field of
    a corpus's line (a label, a source), which a sampled text has none of; asking for one is one line."""

    def __missing__(self, field):
        raise RnnscopeError(f"the model's call asked its document for {escaped(str(field), limit=40)!r}, and a "
                            "sampled text's document holds only a name and a text",
                            "make the call do without that field while sampling (document.get(...)), or sample "
                            "from a model that does not need it")


def sampler(subject):
    """``(subject, encoder, forward)`` of anything ``record`` takes, refused in one line unless its
    encoder decodes; ``forward(ids [1, T]) -> output`` is the user's call, failures one line."""
    from rnnscope.errors import call_user
    from rnnscope.probe.encoders import as_encoder
    from rnnscope.probe.subject import subject_of, takes_document
    sub = subject_of(subject)
    if sub.encoder is None:
        raise RnnscopeError("the model comes with no encoder, so generate cannot turn text into its steps",
                            "pass --encoder file.py:fn, or return (model, encode) from the spec function")
    encoder = as_encoder(sub.encoder)
    if encoder.decode is None:
        raise RnnscopeError(f"the encoder ({encoder.name or type(sub.encoder).__name__}) has no decode, so "
                            "generate cannot turn sampled ids back into text", DECODE_FIX)
    call = sub.call or (lambda model, ids: model(ids))
    extra = {"document": SampledDocument(name="generated", text="")} if takes_document(call) else {}

    def forward(ids):
        return call_user(call, sub.model, ids, doing=f"the model failed on ids [1, {ids.shape[-1]}]",
                         fix="make the model take ids [1, T] (or give Subject(call=...))", **extra)
    return sub, encoder, forward


def _own_logits(output, steps: int, ids_held: int | None) -> torch.Tensor:
    """The last step's logits ``[1, V]`` of ``output [1, steps, V]`` (or its first item); ``V`` more
    than the ``ids_held`` by the model's embedding is a hidden state, not logits."""
    logits = output[0] if isinstance(output, (tuple, list)) and len(output) else output
    if (not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, steps)
            or not logits.is_floating_point() or logits.shape[-1] < 1):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RnnscopeError(f"the model's output on ids [1, {steps}] is {shape}, not next-token logits "
                            f"[1, {steps}, V]", LOGITS_FIX)
    if ids_held is not None and logits.shape[-1] > ids_held:
        raise RnnscopeError(f"the model's output has {logits.shape[-1]} values per step but its embedding holds "
                            f"{ids_held} ids, so it is not next-token logits", LOGITS_FIX)
    return logits[:, -1].float()


def _decoded(encoder, ids: list[int]) -> str:
    from rnnscope.errors import call_user
    text = call_user(encoder.decode, ids, doing="the encoder's decode failed on sampled ids", fix=DECODE_FIX)
    if not isinstance(text, str):
        raise RnnscopeError(f"the encoder's decode returned {type(text).__name__}, not str", DECODE_FIX)
    return text


def clamp_edits(model, forward, ids: torch.Tensor, clamps: dict[str, float]) -> dict:
    """``Intervention`` edits ``{key: (mask [1, units], value [1, units])}`` holding each clamp."""
    if not clamps:
        return {}
    widths = _widths(model, ids, {u.rpartition(":")[0] for u in clamps}, forward)
    return {k: (mask[1:2], fill[1:2]) for k, (mask, fill) in _edits(clamps, widths, 2).items()}


def generate_own(subject, prime: str, length: int, *, clamps: dict[str, float] | None = None, seeds=(0,),
                 temperature: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """``generate`` for a user's model or decoder (a ``Subject``, ``(model, encode)``, ``rs.load(SPEC)``):
    the same rows ``seed, clamped, text, ids`` from the same random numbers, each sample fed its
    whole prefix each step under an ``Intervention`` holding the clamps (prime included)."""
    _check_request(prime, length, temperature)
    sub, encoder, forward = sampler(subject)
    ids = encoder.encode(prime)[0][None]                        # [1, T]
    clamps = dict(clamps or {})
    edits = clamp_edits(sub.model, forward, ids, clamps)
    held = [m.num_embeddings for m in sub.model.modules() if isinstance(m, torch.nn.Embedding)]

    def forward_logits(seq, t):
        return _finite(_own_logits(forward(seq), seq.shape[1], max(held, default=None)), t)
    was = sub.model.training
    sub.model.eval()
    rows = []
    try:
        for seed in tqdm(list(seeds), desc="generate", unit="seed", disable=not progress):
            uniforms = np.random.default_rng(seed).random(length)
            plain = _sample(sub.model, forward_logits, ids, {}, uniforms, temperature)
            rows += [(seed, False, plain), (seed, True, _sample(sub.model, forward_logits, ids, edits, uniforms,
                                                                temperature) if edits else plain)]
    finally:
        sub.model.train(was)
    return pd.DataFrame({"seed": [r[0] for r in rows], "clamped": [r[1] for r in rows],
                         "text": [_decoded(encoder, r[2]) for r in rows], "ids": [r[2] for r in rows]})


def _sample(model, logits, ids: torch.Tensor, edits: dict, uniforms: np.ndarray, temperature: float) -> list[int]:
    """``len(uniforms)`` ids sampled after ``ids [1, T]``, the model under ``edits`` at every step;
    ``logits(seq [1, T'], t) -> [1, V]``, the next token's."""
    seq = ids
    with torch.no_grad(), Intervention(model, edits):
        for t, u in enumerate(uniforms):
            nxt = pick(logits(seq, t), np.array([u]), temperature)
            seq = torch.cat([seq, nxt.view(1, 1).to(seq.dtype)], 1)
    return seq[0, ids.shape[1]:].tolist()


def pick(logits: torch.Tensor, uniforms: np.ndarray, temperature: float) -> torch.Tensor:
    """The next ids ``[rows]`` from ``logits [rows, V]``: the most likely at temperature 0, else the
    inverse CDF of the tempered softmax at ``uniforms [rows]`` (the same number for a seed's two rows)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).double().cumsum(-1)
    u = torch.as_tensor(uniforms).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def sample(subject, prime: str, length: int, **options) -> pd.DataFrame:
    """``generate`` for a zoo checkpoint (every sample in one batch, one character a step), else
    ``generate_own`` (a user's model, one sample at a time). ``options`` as theirs."""
    from rnnscope.probe.subject import CharCheckpoint
    if isinstance(subject, CharCheckpoint):
        return generate(subject.model, subject.vocab, prime, length, **options)
    return generate_own(subject, prime, length, **options)


def record_generated(subject, frame: pd.DataFrame, prime: str, out, *, clamps: dict[str, float] | None = None,
                     temperature: float = 1.0, overwrite: bool = False, dtype: str = "float32"):
    """Write what ``generate`` / ``generate_own`` sampled as a Run: one document per seed, ``prime +
    text`` of the clamped samples (the plain ones without clamps), recorded by ``record`` under the same
    ``Intervention``, so its states, gates and clamped units are the ones the model had while writing it.
    The manifest's ``generated`` holds the prime, clamps, seeds, temperature and length. Returns the Run.
    """
    from rnnscope.probe import record
    sub, encoder, forward = sampler(subject)
    clamps = dict(clamps or {})
    chosen = frame[frame["clamped"] == bool(clamps)]
    head = encoder.encode(prime)[0]
    texts = {}
    for seed, text, ids in zip(chosen["seed"], chosen["text"], chosen["ids"]):
        again = encoder.encode(prime + text)[0]
        want = torch.cat([head, torch.as_tensor(ids, dtype=torch.long)])
        if not torch.equal(again, want):
            at = int((again[:len(want)] != want[:len(again)]).long().argmax()) if min(len(again), len(want)) else 0
            raise RnnscopeError(f"seed {seed}: encoding the decoded text gives other steps than were sampled "
                                f"({len(again)} steps for {len(want)}, first differing at step {at}), so a Run "
                                "of the text would not be what the model generated", "give a decode that encode "
                                "inverts, or generate without --out")
        texts[f"seed {seed}"] = prime + text
    edits = clamp_edits(sub.model, forward, head[None], clamps)
    generated = {"prime": prime, "clamps": clamps, "seeds": [int(s) for s in chosen["seed"]],
                 "temperature": float(temperature), "length": len(chosen["ids"].iloc[0])}
    with Intervention(sub.model, edits):
        return record(sub, texts, out, dtype=dtype, overwrite=overwrite, progress=False,
                      chunk=max(len(encoder.encode(t)[0]) for t in texts.values()), generated=generated)


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
                label = f"clamped {', '.join(f'{u}={v:g}' for u, v in clamps.items())}" \
                    if r["clamped"] and clamps else "unclamped"
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
