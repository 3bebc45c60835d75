"""Probe cost against the plain fused forward (and forward+backward), measured in the same run.

    python benchmarks/probe_overhead.py [--arch lstm] [--chars 20000] [--hidden 512] [--repeat 3]

Model: a char model (embedding 64 -> 2 x 512 LSTM, GRU or RNN -> linear), random weights (speed
does not depend on them). Batch 1 x CHARS and batch 64 x 400. The sides of each group run in --repeat
rounds, every side once a round in a rotating order; each row gives its minimum and median seconds,
the ratio of its minimum to the baseline's, and the median over rounds of its ratio to the baseline's
time in the same round (the figure to read on a shared machine). Rows:
  plain forward               model(ids) under no_grad: the baseline (1.00x)
  probe, every kind           the same forward inside Probe(model): h c i f g o of every layer
  probe, h only               Probe(model, kinds=["h"]): every layer's h_t, nothing replayed
  forward, grad mode on       model(ids) with grad mode on, no probe: oneDNN's training forward, whose
                              workspace the probe reads (its fresh pages are most of the probe's cost)
  naive cell loop             the usual alternative: one step at a time, gates by hand (LSTM only)
  plain forward+backward      summed next-char loss, backward with parameter grads: baseline
  probe grad                  Probe(grad=True): + grad_h (and grad_c) of every layer and step
  probe grad, frozen params   Probe(grad=True, param_grads=False): state gradients only
Then the recurrent module alone on a PackedSequence (64 sequences of 200-400 steps): PyTorch's
packed forward against the probe recording every kind.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rnnscope.probe import Probe
from rnnscope.probe.families import KINDS
from rnnscope.zoo import Architecture, CharModel


def rounds(sides: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds of each side in each of ``repeat`` rounds, after one warm-up call of each. Every round
    runs every side once, in an order rotated round by round, so a stall of the shared machine hits the
    sides of one round alike and none always runs after the same neighbour."""
    names = list(sides)
    for fn in sides.values():
        fn()
    times = {n: [] for n in names}
    for r in range(repeat):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            sides[n]()
            times[n].append(time.perf_counter() - t)
    return times


def rows_against(times: dict[str, list[float]], base: str) -> list[tuple[str, float, float, str, str]]:
    """``(side, min s, median s, ratio of the minimums, median of the per-round ratios)`` against ``base``:
    a ratio taken within a round cancels the load that round ran under, so its median is the stable one."""
    b = times[base]
    return [(n, min(t), statistics.median(t), f"{min(t) / min(b):.2f}x",
             f"{statistics.median(x / y for x, y in zip(t, b)):.2f}x") for n, t in times.items()]


def naive_loop(model: CharModel, ids: torch.Tensor) -> dict:
    """What users write without rnnscope: unroll every layer one step at a time and keep every gate."""
    rnn, x = model.rnn, model.embed(ids)
    B, T, _ = x.shape
    rec = {}
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        b = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        h = x.new_zeros(B, rnn.hidden_size)
        c = x.new_zeros(B, rnn.hidden_size)
        xw = F.linear(x, w_ih, b)
        outs = {k: [] for k in "hcifgo"}
        for t in range(T):
            i, f, g, o = (xw[:, t] + h @ w_hh.T).chunk(4, -1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            for k, v in zip("hcifgo", (h, c, i, f, g, o)):
                outs[k].append(v)
        rec[layer] = {k: torch.stack(v, 1) for k, v in outs.items()}
        x = rec[layer]["h"]
    model.head(x)
    return rec


def loss_of(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def recording_sides(module: torch.nn.Module, inp, keys: int) -> dict:
    """``module(inp)`` under no_grad, plain and inside ``Probe(module)`` (every kind)."""
    def plain():
        with torch.no_grad():
            module(inp)

    def probed():
        with torch.no_grad(), Probe(module) as p:
            module(inp)
        assert len(p.trace) == keys
    return {"plain forward": plain, "probe, every kind": probed}


def bench(model: CharModel, ids: torch.Tensor, repeat: int, naive: bool) -> list[tuple]:

    def probed_h():
        with torch.no_grad(), Probe(model, kinds=["h"]) as p:
            model(ids)
        assert len(p.trace) == 2

    def grad_mode_forward():
        with torch.enable_grad():
            model(ids)

    def cell_loop():
        with torch.no_grad():
            naive_loop(model, ids)

    def plain_backward():
        model.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()

    def probe_grad(param_grads=True):
        model.zero_grad(set_to_none=True)
        with Probe(model, grad=True, param_grads=param_grads) as p:
            loss_of(model, ids).backward()
        for k in p.trace:                  # gradients are computed on first access: count it
            if "grad" in k:
                p.trace[k]

    forward = {**recording_sides(model, ids, 2 * len(KINDS[type(model.rnn).__name__])), "probe, h only": probed_h}
    if isinstance(model.rnn, torch.nn.LSTM):
        forward["forward, grad mode on"] = grad_mode_forward
    rows = rows_against(rounds(forward, repeat), "plain forward")
    if naive:                              # slow: a few rounds of its own against the same baseline
        rows += rows_against(rounds({"plain forward": forward["plain forward"], "naive cell loop": cell_loop},
                                    max(1, repeat // 3)), "plain forward")[1:]
    backward = {"plain forward+backward": plain_backward, "probe grad": probe_grad,
                "probe grad, frozen params": lambda: probe_grad(False)}
    return rows + rows_against(rounds(backward, repeat), "plain forward+backward")


def bench_packed(rnn: torch.nn.Module, repeat: int) -> list[tuple]:
    """The recurrent module alone on a PackedSequence: 64 sequences of 200-400 steps."""
    from torch.nn.utils.rnn import pack_padded_sequence
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(200, 401, (64,), generator=g)
    seq = pack_padded_sequence(torch.randn(400, 64, rnn.input_size, generator=g), lengths, enforce_sorted=False)
    sides = recording_sides(rnn, seq, 2 * len(KINDS[type(rnn).__name__]))
    sides["plain packed forward"] = sides.pop("plain forward")
    return rows_against(rounds(sides, repeat), "plain packed forward")


def show(rows) -> None:
    print(f"  {'':28s} {'min s':>8s} {'median s':>9s} {'min/min':>8s} {'median of round ratios':>23s}")
    for name, lo, med, at_min, paired in rows:
        print(f"  {name:28s} {lo:8.3f} {med:9.3f} {at_min:>8s} {paired:>23s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("lstm", "gru", "rnn"), default="lstm")
    ap.add_argument("--chars", type=int, default=20000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7, help="rounds; each runs every side once (default 7)")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow cell loop")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = CharModel(Architecture(args.arch, 98, 64, args.hidden, 2)).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.arch.upper()} 2 x {args.hidden}")
    for shape in ((1, args.chars), (64, 400)):
        ids = torch.randint(0, 98, shape)
        print(f"\nbatch {shape[0]} x {shape[1]} steps")
        show(bench(model, ids, args.repeat, args.arch == "lstm" and not args.no_naive))
    print(f"\nPackedSequence, batch 64 x 200-400 steps ({args.arch.upper()} module alone)")
    show(bench_packed(model.rnn, args.repeat))


if __name__ == "__main__":
    main()
