"""``record``: stream documents of any length through a model and write every state into a Run.

Each document is encoded into steps (ids and each step's character span, ``probe.encoders``) and
fed in chunks as one sequence (each recurrent module's state is carried from chunk to chunk, so
values equal a single pass); the state starts from zeros at each document unless ``carry``.
Memory is bounded by the chunk; rows are appended to ``.npy`` files with pwrite.

Gradients (``grad=True``) are derivatives of the summed loss (``probe.steploss``). Each chunk is
run ``horizon`` steps past its end and the state is then rewound to the chunk's end, so the
gradient at step t includes every loss from t to at least t + ``horizon``. Losses before t cannot
depend on the state at t, nor can a later document's when the state is reset, so the read-ahead
stops at the document's end (with ``carry`` it runs on into the next), and with ``horizon`` at
least a document's steps the gradients equal those of a single pass.
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
from torch import nn
from tqdm import tqdm

from rnnscope.errors import RnnscopeError, call_user
from rnnscope.store import DTYPES, RunWriter, check_out, documents_frame, open_run, split_key
from rnnscope.store.run import grad_passes
from rnnscope.store.writer import text_bytes

from . import attention as attention_steps, cells
from .corpus import documents_of, frames_of, frames_sha256, is_frames
from .encoders import as_encoder, char_spans
from .keys import KINDS, family_name
from .passes import CHUNK, PASS_BYTES, check_aligned, check_pass, pass_memory
from .sourceside import SourceSide
from .probe import Probe
from .steploss import first_tensor, resolve_loss
from .subject import CharVocabulary, subject_of, takes_document
from .unitstats import _UnitStats
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def model_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _identity(model, mods: dict, card: dict, source: str) -> dict:
    """The manifest's ``model``: where it came from, its checksum, and each recurrent module's shape."""
    def text_or_none(v):        # a card is someone else's JSON: only strings go into the manifest
        return v if isinstance(v, str) else None
    return {"source": str(source), "class": type(model).__name__, "checksum": model_checksum(model),
            "card_name": text_or_none(card.get("name")), "weights_sha256": text_or_none(card.get("weights_sha256")),
            # a zoo card's corpus names the text's language, so analysis knows which features suit it
            "corpus": text_or_none((card.get("corpus") or {}).get("name") if isinstance(card.get("corpus"), dict)
                                   else None),
            "modules": {n: cells.identity(m) if cells.spec_of(m) is not None else
                        {"type": family_name(m), "layers": m.num_layers, "hidden": m.hidden_size,
                         "bidirectional": m.bidirectional, "proj_size": getattr(m, "proj_size", 0)}
                        for n, m in mods.items()}}


def _encode_all(encoder, docs):
    """Every document encoded and joined: ``ids [S]``, ``spans [S, 2]`` in the joined text, the
    documents table. A bad encoding names its document when there are several."""
    ids, spans, chars, steps = [], [], [0], [0]
    for name, text in docs:
        try:
            i, sp = encoder.encode(text)
        except RnnscopeError as err:
            if len(docs) == 1:
                raise
            raise RnnscopeError(f"document {name!r}: {err.problem}", err.fix) from None
        sp = np.where(sp >= 0, sp + chars[-1], -1)
        ids.append(i)
        spans.append(sp)
        chars.append(chars[-1] + len(text))
        steps.append(steps[-1] + len(i))
    return torch.cat(ids), np.concatenate(spans), documents_frame(docs.names, chars, steps, docs.fields)


def _frames_all(docs):
    """Every document's frames joined: ``x [S, features]`` float32, spans ``[S, 2]`` all (-1, -1) (no
    text), the documents table (no characters), ``times [S]`` float64."""
    steps = np.cumsum([0] + [len(a) for a in docs.inputs])
    return (torch.from_numpy(np.concatenate(docs.inputs)), np.full((steps[-1], 2), -1, np.int64),
            documents_frame(docs.names, np.zeros(len(steps), np.int64), steps,
                            [{**f, "frames_sha256": frames_sha256(x)}
                             for f, x in zip(docs.fields or [{}] * len(docs.inputs), docs.inputs)]),
            np.concatenate(docs.times))


def _chosen(mods: dict, modules) -> dict:
    """The recurrent modules to record: ``modules`` (qualified names) or every one."""
    if modules is None:
        return mods
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in mods]
    if unknown or not modules:
        raise RnnscopeError(f"no recurrent module named {', '.join(map(repr, unknown)) or 'at all'} in the model",
                            f"choose --modules from {', '.join(repr(n) for n in mods)}")
    return {n: mods[n] for n in modules}


def _dry_run(model, call, x, grad, kinds, wanted, document: dict, side=frozenset()):
    """Key -> units of the modules ``wanted``, the model's output, and key -> units of the source
    modules ``side`` (which ran over the whole source), from a run over ``x [1, n]``; refused if a
    module ``wanted`` ran another number of steps than ``x`` has, or one of ``side`` did not run."""
    with Probe(model, grad=grad, kinds=kinds, param_grads=False) as p:
        out = _forward(model, call, x, document)
        if grad and isinstance(first_tensor(out), torch.Tensor) and first_tensor(out).requires_grad:
            first_tensor(out).float().sum().backward()
        layout = {k: p.trace[k].shape[-1] for k in p.trace if split_key(k)["module"] in wanted}
        check_aligned(p.trace, {k: u for k, u in layout.items() if split_key(k)["module"] not in p.cells},
                      x.shape[1], "(a dry run over the first document's first steps)")     # cells: in _stream
        found = {k: p.trace[k].shape[-1] for k in p.trace if split_key(k)["module"] in side}
        missing = sorted(set(side) - {split_key(k)["module"] for k in found})
        if missing:
            raise RnnscopeError(f"the source module {missing[0]!r} was not called in a dry run of the model",
                                "name in --source-modules the modules the model runs over the source")
    return layout, out, found


def _stream(model, call, ids, docs, bounds, w: RunWriter, layout: dict[str, int], step_loss, *, grad, carry, chunk,
            horizon, kinds, dtypes: dict[str, str], progress, stored=None, side=None):
    """The streaming loop: document by document (the state reset between them unless ``carry``),
    chunk by chunk within each (the state carried), each chunk's rows written to ``w``; the user's
    call and loss may take the ``document`` each chunk starts in (``docs.document(d)``).
    Returns per-key running statistics, NaN/Inf/overflow counts, and the loss of each window."""
    S, x = len(ids), ids[None]
    arrays = {k: w.states(k, u, dtypes[k]) for k, u in layout.items()}
    losses = w.loss() if step_loss else None
    stats = {k: _UnitStats(u) for k, u in layout.items()}
    bad = {k: {"nonfinite": 0, "overflow": 0, "underflow": 0} for k in layout}
    totals = []
    with tqdm(total=S, unit="step", unit_scale=True, desc="probe", disable=not progress, mininterval=0.5) as bar, \
            Probe(model, grad=grad, kinds=kinds, carry=True, param_grads=False,
                  attention=stored.picks if stored else None) as p:
        looped = [k for k in layout if split_key(k)["module"] in p.cells]
        # the passes the Run reports (``Run.grad_passes``): a reset state cannot be reached by later documents' losses
        passes = grad_passes(np.asarray(bounds, np.int64).reshape(-1, 2), chunk, horizon if grad else 0, carry)
        for d, (a, b) in enumerate(bounds):
            if not carry:
                p.reset()
            for s, e, ahead in passes[(passes[:, 0] >= a) & (passes[:, 0] < b)].tolist():
                with torch.set_grad_enabled(grad):
                    output = _forward(model, call, x[:, s:ahead], docs.document(d))
                    per_step, total = step_loss.window(output, s, ahead, docs.document(d)) if step_loss \
                        else (None, None)
                    if grad:        # a window without a loss (a document's last step alone) has zero gradients
                        (total if total is not None else first_tensor(output).float().sum() * 0).backward()
                # a chunk after the first started from the caller's state (a module left out may keep its own)
                overridden = p.overridden & {split_key(k)["module"] for k in layout}
                if overridden:
                    raise RnnscopeError(f"the model's call passes its own initial state to {sorted(overridden)[0]}, "
                                        "so rnnscope cannot carry the state from one chunk into the next",
                                        "pass None as the initial state in call= (rnnscope carries it), or --chunk "
                                        "at least the longest document's steps")
                for k in looped:                        # a step loop's steps are its cell's calls
                    if p.trace[k].shape[:2] != (1, ahead - s):
                        raise RnnscopeError(f"cell {split_key(k)['module']} took {p.trace[k].shape[1]} steps "
                                            f"(batch {p.trace[k].shape[0]}) over {ahead - s} steps of the encoder",
                                            "make the model call its cell once per id of its input [1, T]")
                check_aligned(p.trace, layout, ahead - s, f"in document {d} (steps {s:,}..{ahead - 1:,})")
                if ahead > e:
                    p.carry_from(e - s - 1)             # the next chunk starts where this one ends
                if stored:                              # a whole document per pass (record sees to it)
                    stored.add(p.attention, ahead - s, d, f"in document {d} (steps {s:,}..{ahead - 1:,})")
                if side:                                # the encoder's rows, over this document's source
                    side.add(p.trace, d, lambda h, dt: h.to(TORCH_DTYPES[dt]).numpy())
                if step_loss:
                    losses.write(s, per_step[: e - s])
                    totals.append(float(total.detach()) if total is not None else np.nan)
                for k in layout:
                    h = p.trace[k][0, : e - s].detach()
                    arrays[k].write(s, h.to(TORCH_DTYPES[dtypes[k]]).numpy())    # torch's F16C conversion
                    for what, count in zip(("nonfinite", "overflow", "underflow"), stats[k].add(h.numpy(), dtypes[k])):
                        bad[k][what] += count
                p.clear()            # bounded memory: this chunk is on disk
                bar.update(e - s)
    return stats, bad, totals


def _default_call(model, ids):
    return model(ids)


def _forward(model, call, x, document: dict):
    """``call(model, x[, document=])``; the user's model failing on the encoder's ids (a dtype it does not
    take, an index it does not hold) is said in one line, not a traceback from deep inside torch."""
    extra = {"document": document} if takes_document(call) else {}
    what = f"frames {list(x.shape)}" if x.is_floating_point() else f"the encoder's ids [1, {x.shape[-1]}]"
    return call_user(call, model, x, doing=f"the model failed on {what}",
                     fix="make the model take ids [1, T] from the encoder, or frames [1, T, features] (or give "
                     "Subject(call=...))", **extra)


def _check_ids_fit(model, ids: torch.Tensor) -> None:
    """An id beyond every embedding of the model is refused before anything runs (torch would say
    only 'index out of range in self', deep inside the forward)."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    top = int(ids.max())
    if sizes and top >= max(sizes):
        raise RnnscopeError(f"the encoder gave the id {top:,} but the model's embedding holds ids 0..{max(sizes) - 1:,}",
                            "make encode return ids the model's vocabulary holds")


def record(subject, texts, out, *, encode=None, loss="auto", modules=None, carry: bool = False, grad: bool = False,
           chunk: int | None = None, horizon: int = 512, kinds=None, dtype: str = "float16",
           grad_dtype: str = "float32", overwrite: bool = False, unk: str | None = None, progress: bool = True,
           source: str = "", memory: int | None = None, client=None, shard_docs: int | None = None, spec=None,
           attention=None, generated: dict | None = None, source_modules=None):
    """Probe a model over one text or many documents and write a Run to ``out``; returns the opened Run.

    Args:
        subject: a zoo ``Checkpoint``, a ``Subject``, ``(model, encode[, loss])``, or an ``nn.Module``
            taking ``ids [1, T]`` (then pass ``encode``).
        texts: a str, a list of str, a dict name -> str, or ``probe.corpus.read_documents(path)``; or
            frames (``probe.corpus.frames_of``: an array ``[T, features]``, a dict name -> array, a list
            of arrays or of ``{"input": [T, features], "times": [T]}``): the model (or ``call``) then takes
            ``[1, T, features]`` float32, no encoder is needed, and the Run stores each step's time stamp.
        encode: anything ``probe.encoders.as_encoder`` takes; overrides the subject's encoder.
        loss: "auto" (next-token cross-entropy when the output is ``[1, T, V]`` logits covering the
            ids; otherwise states only, or refused with ``grad``), None (no loss), or
            ``fn(output, ids [T]) -> [T]`` per step (or a scalar, when each document fits one chunk).
        modules: qualified names of the recurrent modules to record (default every one).
        carry: carry the state across documents instead of starting each from zeros.
        grad: also record ``grad_h`` / ``grad_c``, the derivatives of the summed loss.
        chunk: steps per pass (default 2048). A bidirectional module reads each document whole, so its
            default is the longest document, refused in one line when one pass would need more than
            ``memory`` bytes (default a quarter of the machine's memory).
        generated: what ``analysis.steer.record_generated`` sampled the text with (the manifest's ``generated``).
        source_modules: of an encoder-decoder model (documents with a ``source`` field), the modules that
            read the source: stored as a Run of their own over the source texts, ``RUN/encoder/``
            (``probe.sourceside``), recorded in the same pass, a whole document per call.
        attention: attention modules whose weights to store at every step (a list of qualified names,
            or ``{name: picker}``, as ``Probe``'s): ``run.attention(name)[d] -> [steps, source]``. Each
            document is then one pass; a document's ``source`` field gives its source positions' text.
        dtype: the states' on-disk dtype; ``grad_dtype`` the gradients' (float32: gradients are small by
            nature and span more binades than float16 holds, see benchmarks/grad_storage.py).
        client: a Dask ``distributed.Client``: record on its workers, ``shard_docs`` documents a task, into a
            sharded Run equal to this one (``probe.distributed``; ``spec``: a ``FromSpec`` the workers load
            the model from instead of the pickled subject).
    Returns:
        the Run: ``len(run)`` steps, ``run[key] -> [steps, units]``.
    """
    frames = is_frames(texts)           # steps are input frames, not text: no encoder, no next-token loss
    if frames and attention:            # a frames Run has no source for a row to weigh
        raise RnnscopeError("frames are recorded without attention", "leave attention out")
    if frames and source_modules:
        raise RnnscopeError("frames have no source text for an encoder's side", "leave source_modules out")
    if client is not None and source_modules:
        raise RnnscopeError("an encoder's side is not yet stored in a sharded Run", "record it without a cluster")
    if client is not None:
        from .distributed import record_on
        return record_on(client, subject, texts, out, spec=spec, shard_docs=shard_docs, encode=encode, loss=loss,
                         modules=modules, carry=carry, grad=grad, chunk=chunk, horizon=horizon, kinds=kinds,
                         dtype=dtype, grad_dtype=grad_dtype, memory=memory, overwrite=overwrite, unk=unk,
                         progress=progress, source=source, attention=attention)
    out, sub = Path(out), subject_of(subject)
    model, call = sub.model, sub.call or _default_call
    loss = sub.loss if isinstance(loss, str) and loss == "auto" else loss
    modules = sub.modules if modules is None else modules
    source = source or sub.source
    if encode is None and sub.encoder is None and not frames:
        raise RnnscopeError("no encoder for this model", "pass encode=fn(text) -> ids, or (ids, spans)")
    encoder = None if frames else as_encoder(sub.encoder if encode is None else encode, unk=unk)
    loss = None if frames and isinstance(loss, str) else loss
    for d in (dtype, grad_dtype):
        if d not in DTYPES:
            raise RnnscopeError(f"unknown dtype {d!r}", f"use one of {', '.join(DTYPES)}")
    asked_chunk = chunk is not None
    chunk = CHUNK if chunk is None else chunk
    if chunk < 1 or horizon < 0:
        raise RnnscopeError(f"chunk must be >= 1 and horizon >= 0 (got {chunk}, {horizon})", "fix --chunk/--horizon")
    docs = frames_of(texts) if frames else documents_of(texts)
    picks = attention_steps.named(model, attention) if attention else None
    if grad and loss is None:
        raise RnnscopeError("gradients need a loss, and loss is None", "pass a loss, or probe without --grad")
    check_out(out, overwrite)          # before the model runs: a bad --out costs nothing
    text = "" if frames else "".join(docs.texts)
    text_bytes(text)
    ids, spans, frame, times = _frames_all(docs) if frames else (*_encode_all(encoder, docs), None)
    if not frames:
        _check_ids_fit(model, ids)
    S, bounds = len(ids), list(zip(frame.step_start.tolist(), frame.step_end.tolist()))
    longest = max(b - a for a, b in bounds)
    side_modules = [source_modules] if isinstance(source_modules, str) else list(source_modules or [])
    sources = attention_steps.sources_of(docs, encoder) if picks or side_modules else None
    if side_modules and carry and len(docs) > 1:      # the encoder reads each document's own source afresh
        raise RnnscopeError("an encoder's side is read afresh from each document's source, so its state cannot "
                            "be carried into the next document", "probe without --carry, or without --source-modules")
    if side_modules and sources is None:
        raise RnnscopeError("source modules read each document's source, and these documents have none",
                            'give a .jsonl corpus whose lines carry "source" and "target"')
    if (picks or side_modules) and longest > chunk:     # a row weighs (an encoder reads) the source of this call
        if asked_chunk:
            raise RnnscopeError(f"{'attention' if picks else 'an encoder side'} is stored a whole document per call, "
                                f"and --chunk {chunk} is shorter than the longest document",
                                f"pass --chunk {longest} (or more)")
        chunk = longest
    if grad and isinstance(loss, str) and longest < 2:     # the next-token loss of one step has no next token
        raise RnnscopeError("gradients need at least two characters (a one-character text has no next-character "
                            "loss)" if encoder.kind == "char" else "gradients need a document of two steps or more "
                            "(a one-step document has no next-token loss)",
                            "give a longer text, or probe without --grad")
    looped = Probe(model).cells
    everyone = {**Probe(model).modules, **looped}
    unknown = [m for m in side_modules if m not in everyone]
    if unknown:
        raise RnnscopeError(f"no recurrent module named {unknown[0]!r} in the model for --source-modules",
                            f"choose from {', '.join(repr(n) for n in everyone)}")
    both = sorted(set([modules] if isinstance(modules, str) else modules or []) & set(side_modules))
    if both:
        raise RnnscopeError(f"module {both[0]!r} is named in both --modules and --source-modules",
                            "a module reads either the target's steps or the source's")
    mods = _chosen({n: m for n, m in everyone.items() if n not in side_modules}, modules)
    cell_kinds = [cells.known_kinds(m) for m in mods.values() if m in looped.values()]
    known = {k for m in mods.values() if m not in looped.values() for k in KINDS[family_name(m)]}
    known |= {k for ks in cell_kinds if ks is not None for k in ks}
    if kinds is not None and set(kinds) - known and None not in cell_kinds:
        raise RnnscopeError(f"unknown state kind(s) {', '.join(sorted(set(kinds) - known))} for this model",
                            f"choose from {', '.join(sorted(known))}")
    whole = [n for n, m in Probe(model).modules.items() if m.bidirectional]
    if whole:
        if longest > chunk and not asked_chunk:     # its future would be in the next chunk: one pass each
            chunk = longest
        elif longest > chunk:
            raise RnnscopeError("a bidirectional module reads the text backwards too, so it cannot be streamed in "
                                f"chunks", f"pass --chunk {longest} (or more) to probe each document in one pass")
        if carry and len(docs) > 1:
            raise RnnscopeError("a bidirectional module's state cannot be carried across documents",
                                "probe without --carry")
    chosen_cells = [n for n, m in mods.items() if m in looped.values()]
    if chosen_cells and (longest > chunk or (carry and len(docs) > 1)):      # the model's own loop holds its state
        raise RnnscopeError(f"a step-loop model carries its cells' state itself ({chosen_cells[0]}), so rnnscope "
                            "records it a whole document per call and cannot carry it from one document into the next",
                            f"pass --chunk {longest} (or more)" + (" and probe without --carry" if carry else "")
                            + ", or record modules without the cells")
    doc = np.repeat(np.arange(len(bounds)), [b - a for a, b in bounds])
    next_ok = np.append(doc[1:] == doc[:-1], False)         # a next token in the same document
    was_training = model.training
    model.eval()
    try:
        n = min(2, bounds[0][1])
        layout, dry, side_layout = _dry_run(model, call, ids[None, :n], grad, kinds, set(mods), docs.document(0),
                                            set(side_modules))
        step_loss = resolve_loss(loss, dry, n, ids, next_ok, bounds, grad=grad)
        for k in layout:                # a module name the store cannot hold as a file name is refused here
            try:
                split_key(k)
            except RnnscopeError:
                raise RnnscopeError(f"the state key {k[:80]!r} cannot name a file in a Run",
                                    "name recurrent submodules with letters, digits and _ only") from None
        if whole and chunk == longest and not asked_chunk:
            check_pass(whole[0], docs.names[int(np.argmax([b - a for a, b in bounds]))], longest,
                        sum(layout.values()) * PASS_BYTES[grad], pass_memory() if memory is None else memory)
        dtypes = {k: grad_dtype if split_key(k)["kind"].startswith("grad_") else dtype for k in layout}
        per_step = sum(u * np.dtype(DTYPES[dtypes[k]]).itemsize for k, u in layout.items())
        need = S * per_step + S * 28 + len(text.encode())
        free = shutil.disk_usage(out.resolve().parent if out.resolve().parent.exists() else Path.cwd()).free
        print(f"probe: {len(layout)} keys, {sum(layout.values()):,} units x {S:,} steps ({len(docs):,} documents) "
              f"in {'/'.join(sorted(set(dtypes.values())))}: {need / 1e6:,.1f} MB ({per_step / 1e3:.1f} KB per step)")
        if need * 1.05 > free:
            raise RnnscopeError(f"the run needs {need / 1e9:.2f} GB but {out.parent} has {free / 1e9:.2f} GB free",
                                "record fewer --kinds, use --dtype float16, a shorter text, or another disk")
        with RunWriter(out, text, spans=spans, ids=None if frames else ids.numpy(), documents=frame, dtype=dtype,
                       overwrite=overwrite, times=times) as w:
            stored = attention_steps.StoredAttention(w, picks, docs.names, sources) if picks else None
            side = None
            if side_modules:
                side = SourceSide(w, side_modules, sources, docs.names, {
                    k: grad_dtype if split_key(k)["kind"].startswith("grad_") else dtype for k in side_layout})
                side.open(side_layout)
            stats, bad, totals = _stream(model, call, ids, docs, bounds, w, layout, step_loss, grad=grad, carry=carry,
                                         chunk=chunk, horizon=horizon, kinds=kinds, dtypes=dtypes, progress=progress,
                                         stored=stored, side=side)
            w.units(pd.concat([stats[k].frame(k) for k in layout], ignore_index=True))
            flagged = {k: v for k, v in bad.items() if v["nonfinite"] or v["overflow"]}
            side_bad = {f"encoder/{k}": v for k, v in (side.bad if side is not None else {}).items()}
            stored_as = {**dtypes, **{f"encoder/{k}": d for k, d in (side.dtypes if side is not None else {}).items()}}
            for k, v in {**bad, **side_bad}.items():
                if v["nonfinite"] or v["overflow"]:
                    print(f"probe: warning: {k} has {v['nonfinite']} NaN/Inf values and {v['overflow']} that "
                          f"overflow {stored_as.get(k, dtype)}; flagged in the manifest")
            for k, v in {**bad, **side_bad}.items():    # a state's tiny values are tiny next to its unit; a gradient's are its news
                if v["underflow"] and split_key(k.removeprefix("encoder/"))["kind"].startswith("grad_"):
                    print(f"probe: warning: {k} has {v['underflow']:,} non-zero values that became zero or subnormal "
                          f"in {stored_as.get(k, dtype)}; counted in the manifest (record gradients in float32)")
            manifest = {
                "model": _identity(model, {**Probe(model).modules, **looped}, sub.card, source),
                "encoder": {"kind": "frames", "name": None} if frames else
                {"kind": "char" if np.array_equal(spans, char_spans(len(text))) else "spans", "name": encoder.name},
                "vocab": sub.encoder.chars if encode is None and isinstance(sub.encoder, CharVocabulary) else None,
                "unk": unk, "carry": carry, "modules": sorted(mods),
                "kinds": sorted({split_key(k)["kind"] for k in layout}), "grad": grad, "chunk": chunk,
                "grad_horizon": horizon if grad else None,
                "loss": _loss_entry(step_loss, w, totals),
                "keys": {k: {"units": u, **bad[k]} for k, u in layout.items()},
                "nonfinite": bool(flagged) or any(v["nonfinite"] or v["overflow"] for v in side_bad.values()),
                **(stored.manifest() if stored else {}),
                **({"generated": generated} if generated else {}),
            }
            if side is not None:            # written inside this Run's unfinished folder: both appear, or neither
                shared = ("model", "vocab", "unk", "carry", "grad", "chunk", "grad_horizon")
                manifest["source_side"] = side.commit({**{k: manifest[k] for k in shared},
                                                       "encoder_name": manifest["encoder"].get("name")})
            w.commit(manifest)
    except KeyboardInterrupt:
        raise RnnscopeError(f"interrupted: no run was written to {out}", "run the probe again") from None
    finally:
        model.train(was_training)
    return open_run(out)


def _loss_entry(step_loss, w: RunWriter, totals: list[float]) -> dict | None:
    """The manifest's loss: its kind and mean in nats per step, or per document for a scalar loss (each
    window then is one whole document, so ``totals`` are the documents' losses, written beside)."""
    if step_loss is None:
        return None
    if step_loss.scalar:
        w.document_loss(np.asarray(totals, np.float32))
    with warnings.catch_warnings():       # all NaN (no next token, or a model producing NaN): the mean is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = float(np.nanmean(totals)) if step_loss.scalar else float(np.nanmean(w.read_loss()))
    per = "document" if step_loss.scalar else "step"
    return {"kind": step_loss.kind, "per": per, "mean_nats": mean, f"bits_per_{per}": mean / np.log(2)}
