"""The neuron search's two passes on a Dask cluster: one task per run of blocks of a key, their
partial sums reduced on the client; and the sparse probe's rows of its units (``gather_rows``).

``find_neurons(run, client=client)`` calls ``score_key`` in place of ``neurons._score_key``; the
table is the single-process one. Pass 1 sends back each shard's per-unit histogram of its scored
rows in each part (integers: the sum is exact); the client turns the totals into mid-ranks, as one
process does. Pass 2 sends back each task's sums, its products with the label columns of the rows
it holds, and its rank products. A task reads exactly the blocks one process reads (the same
``chunk`` grid, across shard boundaries), so each block's float32 product is the same, and only
the order of the float64 additions of whole blocks differs (1e-12 on a score, not the 1e-6 that
cutting the float32 products at shard boundaries costs). The ranking, the shift nulls (within documents) and everything after
the passes run on the client, unchanged.

Workers open the shard's ``.npy`` by the path the client checked (``open_run``), so they must see
the Run on a shared file system; the label columns of a shard's rows travel with its task (the raw
feature tracks are computed on the workers from each shard's text, ``reductions.worker_features``,
but normalised, ranked and shifted over the whole part on the client).
"""
from __future__ import annotations

import weakref

import numpy as np

from rnnscope.store.shards import ShardedRows

from . import kernels
from .kernels import BINS

BLOCKS_PER_TASK = 64        # blocks of ``chunk`` rows a task reads: 1M rows, about a second of a pass per 256 units


def _files(a) -> tuple[list[str], np.ndarray] | None:
    """The ``.npy`` files of ``a`` and the steps each begins at (``[files + 1]``); None for an array that
    is not a Run's (an in-memory trace: scored in this process)."""
    parts, bounds = (a.parts, a.bounds) if isinstance(a, ShardedRows) else ([a], np.array([0, len(a)]))
    if not all(isinstance(p, np.memmap) and p.filename for p in parts):
        return None
    return [str(p.filename) for p in parts], np.asarray(bounds, np.int64)


class _Rows:
    """Rows ``[s, e)`` of the Run's key read from the files they lie in, each opened once per task."""

    def __init__(self, files, bounds):
        from rnnscope.probe.distributed import task_threads
        task_threads()          # one thread a task (or --threads): a worker's tasks do not oversubscribe its cores
        self.files, self.bounds, self.open = files, bounds, {}

    def __call__(self, s: int, e: int) -> np.ndarray:
        pieces = []
        for k in range(int(np.searchsorted(self.bounds, s, "right")) - 1, len(self.files)):
            lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
            if lo >= e:
                break
            if k not in self.open:
                self.open[k] = np.load(self.files[k], mmap_mode="r", allow_pickle=False)
            pieces.append(self.open[k][max(s, lo) - lo: min(e, hi) - lo])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _spans(rows, starts, end, chunk):
    """``(s, e, i0, i1)`` of each block at ``starts`` that holds scored rows: its steps ``[s, e)`` and
    their positions ``[i0, i1)`` in ``rows`` (one process's grid)."""
    for s in starts:
        e = min(end, s + chunk)
        i0, i1 = (int(i) for i in np.searchsorted(rows, [s, e]))
        if i1 > i0:
            yield s, e, i0, i1


def _blocks(read, rows, starts, end, chunk):
    """``(position in rows, the block's scored rows)`` for the blocks at ``starts``."""
    for s, e, i0, i1 in _spans(rows, starts, end, chunk):
        block = read(s, e)
        yield i0, (block if i1 - i0 == e - s else np.asarray(block)[rows[i0:i1] - s])


def _histogram(files, bounds, rows, starts, end, chunk):
    """Pass 1: ``counts [units, BINS]`` of the scored ``rows`` in the blocks at ``starts``."""
    read = _Rows(files, bounds)
    counts = None
    for _, block in _blocks(read, rows, starts, end, chunk):
        counts = np.zeros((block.shape[1], BINS), np.int32) if counts is None else counts
        kernels.histogram(kernels.float16_bits(block), counts)
    return None if counts is None else counts.astype(np.int64)


def _sums(files, bounds, rows, starts, end, chunk, labels, mid, ref, width):
    """Pass 2: ``s1, s2, bad [units]``, ``xc [units, X columns]``, ``rc [units, R columns]`` of those blocks
    (``labels``: ``_Labels``, the part's columns on ``rows``), with ``labels.run_block``, the kernel and
    products of one process."""
    from .labels import accumulators, assemble, run_block, single_blas
    read = _Rows(files, bounds)
    U = len(ref)
    s1, s2, bad = np.zeros(U), np.zeros(U), np.zeros(U, bool)
    acc = accumulators(labels, U, width)
    with single_blas():
        for (p0, raw), share in zip(_blocks(read, rows, starts, end, chunk), labels.shares):
            run_block(raw, p0, labels, mid, ref, s1, s2, bad, acc, share)
    return (s1, s2, bad, *assemble(labels, acc, s1))


class _Labels:
    """What a task's worker needs of a part (``labels.Labels``) on its rows: the columns BLAS multiplies
    (the rest go in each block's share), the groups, centres and scales, and each block's share."""

    def __init__(self, part, i0: int, i1: int, blocks: list[tuple[int, int]]):
        self.nx, self.nr, self.groups, self.blas = part.nx, part.nr, part.groups, part.blas
        self.centre, self.scale = part.centre, part.scale
        self.whole = {g: np.ascontiguousarray(w[:, i0:i1]) if g.endswith("d") and part.blas[g[0]] else w[:, :0]
                      for g, w in part.whole.items()}
        self.shares = [part.block(a, b) for a, b in blocks]


_SENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()     # part -> its scattered rows and labels


def _tasks(client, rows, part, hi: int, chunk: int) -> list:
    """Per task: its block starts, and futures of its scored rows and their label columns, on the
    workers; sent once per part and reused for every key (the labels are the same for all)."""
    sent = _SENT.setdefault(part, {})
    at = (client.id, chunk, BLOCKS_PER_TASK)
    if at not in sent:
        grid, tasks = list(range(int(rows[0]), hi, chunk)), []
        for t in range(0, len(grid), BLOCKS_PER_TASK):
            starts = grid[t:t + BLOCKS_PER_TASK]
            i0, i1 = np.searchsorted(rows, [starts[0], min(hi, starts[-1] + chunk)])
            blocks = [(a, b) for _, _, a, b in _spans(rows, starts, hi, chunk)]     # the blocks _blocks yields
            labels = _Labels(part, int(i0), int(i1), blocks)
            tasks.append((starts, *client.scatter([rows[i0:i1], labels])))
        sent[at] = tasks
    return sent[at]


def score_key(client, a, parts, chunk) -> list[dict]:
    """``neurons._score_key(a, parts, chunk)`` with both passes on ``client``'s workers: per part (its
    scored ``rows`` and label columns), the same accumulators."""
    from .neurons import _score_key
    found = _files(a)
    if found is None:
        return _score_key(a, parts, chunk)
    files, bounds = found
    out = []
    for rows, part in parts:
        hi, n = int(rows[-1]) + 1, len(rows)
        tasks = _tasks(client, rows, part, hi, chunk)
        counts = [c for c in client.gather([client.submit(_histogram, files, bounds, r, st, hi, chunk, pure=False)
                                            for st, r, _ in tasks]) if c is not None]
        c = sum(counts)
        mid, rank_ss = np.empty(c.shape, np.float32), np.empty(len(c))
        kernels.midranks(c, n, mid, rank_ss)                     # centred mid-ranks per bin, as one process
        rank_sd = np.sqrt(rank_ss)
        ref = np.nan_to_num(np.asarray(a[rows[:1024]], np.float64).mean(0))
        [mid_f] = client.scatter([mid], broadcast=True)
        got = client.gather([client.submit(_sums, files, bounds, r, st, hi, chunk, labels, mid_f, ref, min(chunk, n),
                                           pure=False)
                             for st, r, labels in tasks])
        s1, s2, xc, rc = (sum(g[i] for g in got) for i in (0, 1, 3, 4))
        bad = np.logical_or.reduce([g[2] for g in got])
        sxx = s2 - s1 * s1 / n
        out.append({"n": n, "sd": np.sqrt(np.maximum(sxx, 0)), "mean": ref + s1 / n, "xc": xc, "rc": rc,
                    "rank_sd": rank_sd, "bad": bad, "constant": (s2 == 0) & ~bad})
    return out


def _shard_rows(files, steps, idx) -> np.ndarray:
    """On a worker: ``[len(steps), units]`` float64, the rows ``steps`` of each key's file (this shard's
    own step numbers), its units ``idx``, side by side in the order of ``files``."""
    return np.concatenate([np.asarray(np.load(f, mmap_mode="r", allow_pickle=False)[steps][:, i], np.float64)
                           for f, i in zip(files, idx)], 1)


def gather_rows(client, arrays: dict, by_key: dict[str, list[int]], steps: np.ndarray) -> np.ndarray | None:
    """``[len(steps), units]`` float64 in C order: at ``steps`` (any order), the units ``by_key[key]`` of each key,
    side by side in the order of ``by_key``, as ``arrays[key][steps][:, units]`` gives them; one task per
    shard reads its own rows. None when a key is not a Run's memory map (an in-memory trace: read here)."""
    found = [_files(arrays[k]) for k in by_key]
    if any(f is None for f in found):
        return None
    bounds = found[0][1]
    steps = np.asarray(steps, np.int64)
    shard = np.searchsorted(bounds, steps, "right") - 1
    out = np.empty((len(steps), sum(len(i) for i in by_key.values())))
    at = {k: np.flatnonzero(shard == k) for k in np.unique(shard)}
    futures = {k: client.submit(_shard_rows, [f[0][k] for f in found], steps[pos] - bounds[k], list(by_key.values()),
                                pure=False) for k, pos in at.items()}
    for k, rows in zip(futures, client.gather(list(futures.values()))):
        out[at[k]] = rows
    return out
