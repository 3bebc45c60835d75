"""The ``rnnscope`` command: parses arguments (``rnnscope.parser``), calls the packages, prints what
they return. One small function per subcommand; no decision of its own lives here."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from .parser import parser


def zoo_list(args) -> None:
    import pandas as pd
    from rnnscope.zoo import catalogue
    rows = catalogue()
    print(json.dumps(rows, indent=1) if args.json else pd.DataFrame(rows).to_string(index=False) if rows
          else "no checkpoints shipped")


def zoo_corpus(args) -> None:
    from rnnscope.zoo.corpora import corpus_for
    c = corpus_for(args.name, deb=args.deb, sdist=args.sdist, rebuild=args.rebuild)
    for split, info in c.manifest["splits"].items():
        print(f"{split:5s} {info['chars']:>10,d} chars  {len(info['files']):4d} files  {c.path / (split + '.txt')}")


def zoo_train(args) -> None:
    from rnnscope.zoo.train import config_from, train
    out = train(config_from(**vars(args)), Path(args.out), fresh=args.fresh, threads=args.threads)
    card = json.loads((out / "card.json").read_text())
    print(f"wrote {out}: val {card['val_loss']:.4f} nats/char ({card['val_bpc']:.3f} bits), "
          f"test {card['test_loss']:.4f} nats/char ({card['test_bpc']:.3f} bits)")


def probe(args) -> None:
    from rnnscope import loading
    from rnnscope.probe import record
    from rnnscope.probe.specs import subject_and_options
    spec = loading.spec_of(args.checkpoint, args.model)
    documents = loading.frames_of(args.frames, args.times, {       # read before the model loads
        "--encoder": args.encoder, "--attention": args.attention, "--source-modules": args.source_modules,
        "--scheduler": args.scheduler, "--workers": args.workers,
        "--shard-docs": args.shard_docs, "--max-chars": args.max_chars, "--unk": args.unk}) \
        if args.frames or args.times else None
    subject, asked = subject_and_options(spec, args.encoder, args.modules, args.loss, args.carry,
                                         frames=documents is not None)
    from rnnscope.probe.distributed import FromSpec, cluster_for
    with cluster_for(args.scheduler, args.workers, args.threads) as client:
        documents = loading.texts_of(args.text, args.max_chars) if documents is None else documents
        run = record(subject, documents, args.out, grad=args.grad,
                     chunk=args.chunk, horizon=args.horizon, kinds=args.kinds or None, dtype=args.dtype,
                     grad_dtype=args.grad_dtype,
                     overwrite=args.overwrite, unk=args.unk, source=spec, client=client, shard_docs=args.shard_docs,
                     spec=FromSpec.of(spec, args.encoder, args.loss, args.modules) if client else None,
                     attention=args.attention, source_modules=args.source_modules, **asked)
    loss = run.manifest["loss"]
    per = "char" if run.manifest.get("encoder", {}).get("kind", "char") == "char" else "step"
    steps = f"{len(run):,} chars" if per == "char" else f"{len(run):,} steps over {run.chars:,} chars"
    steps = f"{len(run):,} frames in {len(run.documents):,} documents" if run.frames else steps
    per = "document" if (loss or {}).get("per") == "document" else per
    said = f", loss {loss['mean_nats']:.4f} nats/{per} ({loss['mean_nats'] / math.log(2):.3f} bits/{per})" \
        if loss else ", no loss"
    under = {k: n for k, n in run.underflow.items() if ".grad_" in k}     # a gradient's small values are its news
    said += f", {sum(under.values()):,} gradient values underflowed to zero or subnormal" if under else ""
    said += f", attention of {', '.join(run.attention_names())} at every step" if run.attention_names() else ""
    side = run.manifest.get("source_side")
    said += (f"; the encoder's side ({', '.join(side['modules'])}, {side['steps']:,} source steps) in "
             f"{run.path / side['folder']}") if side else ""
    print(f"wrote {run.path}: {steps}, {len(run.keys())} keys{said}")


def analyze(args) -> None:
    from rnnscope.store import open_input, table_path
    given = open_input(args.run)
    if not hasattr(given, "keys"):              # a watch log: how far back the gradient reaches, by step
        from rnnscope.analysis.training import training_report
        print(training_report(given, args.run))
        return
    from rnnscope.analysis import report
    if args.unit:
        print(report.unit_report(given, args.unit, args.contexts or 10))
        return
    language = "auto" if args.language == "auto" else (None if args.language == "prose" else args.language)
    from rnnscope.probe.distributed import cluster_for
    from rnnscope import loading
    names, own = loading.features_of(args.features or [])
    frames = loading.frames_of(args.frames, args.times) if args.frames or args.times else None
    with cluster_for(args.scheduler, args.workers, args.threads) as client:
        out = report.analyze(given, features=names, own=own, language=language, heldout=args.heldout,
                             shifts=args.shifts, checkpoint=args.checkpoint, decay=not args.no_decay,
                             max_lag=args.max_lag, sparse=args.sparse, ablation=args.ablate, controls=args.controls,
                             contexts=args.contexts, client=client, model=args.model, encoder=args.encoder,
                             model_loss=args.loss, documents=args.documents, ablate_units=args.ablate_units,
                             frames=frames)
    print("\n".join(report.report_lines(out, args.heldout, args.top)))
    print(f"\nwrote {', '.join(out['summary']['tables'])} into {table_path(given, 'neurons').parent}")


def serve(args) -> None:
    from rnnscope.store.watchlog import is_watch_log
    if is_watch_log(args.run):
        from rnnscope.dashboards.watch_app import serve_watch
        serve_watch(args.run, port=args.port, host=args.host, show=args.show, origins=args.origin)
    else:
        from rnnscope.dashboards import serve as serve_run
        serve_run(args.run, port=args.port, host=args.host, show=args.show, window=args.window,
                  origins=args.origin)


def generate(args) -> None:
    from rnnscope import loading
    from rnnscope.analysis.steer import (feature_share, generation_report, measured, parse_clamp, record_generated,
                                         sample)
    from rnnscope.probe.specs import subject_and_options
    from rnnscope.store import check_out
    spec = loading.spec_of(args.checkpoint, args.model)
    clamps = dict(parse_clamp(c) for c in args.clamp or [])
    if args.out:
        check_out(args.out, args.overwrite)         # before the model runs: a bad --out costs nothing
    subject, _ = subject_and_options(spec, args.encoder)
    frame = sample(subject, args.prime, args.length, clamps=clamps,
                   seeds=list(range(args.seed, args.seed + args.seeds)), temperature=args.temperature,
                   progress=args.seeds * args.length > 20000)
    if args.measure:
        frame = feature_share(frame, args.prime, measured(args.measure, args.language))
    print("\n".join(generation_report(frame, args.prime, clamps, args.measure, args.length)))
    if args.out:
        run = record_generated(subject, frame, args.prime, args.out, clamps=clamps, temperature=args.temperature,
                               overwrite=args.overwrite)
        print(f"wrote {run.path}: {len(run):,} steps of {len(run.manifest['generated']['seeds'])} generated "
              f"text(s), {len(run.keys())} keys")


def export(args) -> None:
    from rnnscope.dashboards.export import check_out_file, export_run
    from rnnscope.errors import RnnscopeError
    from rnnscope.store.watchlog import is_watch_log
    out = check_out_file(args.out, args.overwrite)
    if is_watch_log(args.run):                      # a training log: its figures, one PNG
        from rnnscope.dashboards.watch_export import export_watch
        print(f"wrote {export_watch(args.run, out, key=args.key)}")
        return
    if args.key:
        raise RnnscopeError("--key chooses the decay heatmap of a watch log", "leave it out for a Run")
    written = export_run(args.run, out, unit=args.unit, units=args.units, feature=args.feature, top=args.top,
                         start=args.start, end=args.end, document=args.document, attention=args.attention)
    print(f"wrote {written}")


def spectrum(args) -> None:
    from rnnscope import zoo
    from rnnscope.analysis.lyapunov import spectrum, spectrum_json, spectrum_report
    from rnnscope.store.files import read_text
    ck = zoo.load(args.checkpoint)
    ids = ck.vocab.encode(read_text(args.text)[: args.chars], unk=args.unk)
    table = spectrum(ck.model, ids, k=args.exponents, max_lag=args.max_lag, positions=args.positions,
                     progress=sys.stderr.isatty())
    print(spectrum_json(table) if args.json else spectrum_report(table, ids.shape[1], args.max_lag))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rnnscope.errors import RnnscopeError, first_line
    from rnnscope.store.writer import interrupt_on_sigterm
    interrupt_on_sigterm()             # `kill` and `timeout` clean up like Ctrl-C
    import warnings                    # a warning is one line of news, not our file and line number
    plain, warnings.formatwarning = warnings.formatwarning, lambda message, *_, **__: \
        f"rnnscope: warning: {first_line(message, 400)}\n"
    try:
        args.func(args)
    except RnnscopeError as err:
        print(f"rnnscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnscope: interrupted", file=sys.stderr)
        return 130
    except OSError as err:          # the disk filled, a permission was refused: the user's to fix
        where = f" ({err.filename})" if err.filename else ""
        print(f"rnnscope: error: {err.strerror or err}{where} — free space or fix permissions, then run again",
              file=sys.stderr)
        return 2
    except Exception as err:        # a bug in rnnscope: one line, the traceback only on request
        if os.environ.get("RNNSCOPE_DEBUG"):
            raise
        first = first_line(err, 200)
        print(f"rnnscope: error: internal error {type(err).__name__}: {first} — this is a bug in rnnscope; "
              "run again with RNNSCOPE_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 3
    finally:
        warnings.formatwarning = plain        # main() called in a process of the caller's leaves it as it was
    return 0


if __name__ == "__main__":
    sys.exit(main())
