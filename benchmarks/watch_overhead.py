"""Watch's cost in a training loop against the plain training step, measured in the same run.

    python benchmarks/watch_overhead.py [--arch lstm] [--hidden 256] [--batch 32] [--seq-len 100] [--repeat 5]

Model: the zoo's char model (embedding 64 -> 2 x HIDDEN LSTM, GRU or RNN -> linear), random weights,
SGD. One training step = forward, next-char loss, backward, clip, optimizer step. Rows:
  plain step                  no Watch: the baseline (1.00x)
  unwatched step              inside ``watch.step(step)`` with ``step % every != 0``: should cost nothing
  watched step                ``step % every == 0``: Probe(grad=True), the last step's extra backward,
                              the norms, decay, saturation (the block write is amortised: flush_every=10)
  amortised at every=100      (99 unwatched + 1 watched) / 100
The three kinds of step are interleaved (plain, unwatched, watched, plain, ...) after a warm-up, so
drift in the machine's speed hits all alike; each row gives the min and the median of --repeat rounds,
and ratios are against the plain step's median from the same rounds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from rnnscope.probe.watch import Watch
from rnnscope.zoo import Architecture, CharModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["lstm", "gru", "rnn"], default="lstm")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = CharModel(Architecture(a.arch, 96, 64, a.hidden, 2)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, 96, (a.batch, a.seq_len))
    y = torch.randint(0, 96, (a.batch, a.seq_len))

    def plain_step():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    with tempfile.TemporaryDirectory() as d:
        watch = Watch(model, out=f"{d}/log", every=100, flush_every=10)
        step = [1]

        def watched_step(n):
            with watch.step(n):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                watch.loss(loss)
            watch.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()

        def unwatched():
            step[0] += 1 + (step[0] % 100 == 99)      # never a multiple of 100
            watched_step(step[0])

        def watched():
            step[0] = (step[0] // 100 + 1) * 100
            watched_step(step[0])

        rows = {"plain step": plain_step, "unwatched step": unwatched, "watched step": watched}
        for fn in rows.values():           # warm-up: numba's compiled loops, oneDNN's primitives
            fn()
            fn()
        times = {k: [] for k in rows}
        for _ in range(a.repeat):
            for k, fn in rows.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        watch.close()
    base = statistics.median(times["plain step"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.arch}, 2 x {a.hidden}, batch {a.batch} x {a.seq_len}, {torch.get_num_threads()} threads, "
          f"{a.repeat} interleaved rounds")
    print(f"{'row':28s} {'min s':>9s} {'median s':>9s} {'vs plain':>9s}")
    for k, v in times.items():
        print(f"{k:28s} {min(v):9.4f} {med[k]:9.4f} {med[k] / base:8.2f}x")
    amortised = (99 * med["unwatched step"] + med["watched step"]) / 100
    print(f"{'amortised at every=100':28s} {'':9s} {amortised:9.4f} {amortised / base:8.2f}x")


if __name__ == "__main__":
    main()
