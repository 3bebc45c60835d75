"""Recording on a Dask cluster: the corpus split by whole documents into shards, one task each,
into a sharded Run (``rnnscope.store.shards``) that equals the single-process Run bit for bit.

``record(subject, texts, out, client=client)`` (or ``rnnscope probe ... --scheduler ADDRESS |
--workers N``) plans shards of ``shard_docs`` documents, reuses those an interrupted record of the
same plan finished (each checked: a complete Run of the planned text, by its SHA-256, and model),
and submits one task per remaining shard (a step loop's attention and a Run of frames, with its
time stamps, too: frames have no text, so the plan holds each shard's SHA-256 of its frames and times,
and a changed frame starts the build afresh). A task writes its shard atomically
(``store.shards.write_shard``), so a task that runs twice, or again after its worker died, is
harmless; the manifest is written on the client, last.

How the model reaches the workers:
- from Python, the subject itself is pickled (cloudpickle) on the client and the bytes sent to each
  worker once (``client.scatter(..., broadcast=True)``), unpickled there once: its classes must be
  importable on the workers (an installed package, or ``client.upload_file``), or defined in
  ``__main__`` / a notebook, which cloudpickle sends by value;
- from the command line, the SPEC is loaded by each worker, once (cached by spec in the worker): a
  ``file.py`` in it (``--model``, ``--encoder``, ``--loss``) is sent with the task and used from the same
  absolute path when the workers share the file system and it is the same file, else from a copy in the
  worker's temporary folder; weights, checkpoint folders and archives are read from the same absolute
  path, so on a cluster they must be on a shared file system (``zoo:`` names need nothing).

A Dask cluster runs pickled tasks: connect only to a scheduler you trust. Each task runs torch and
numba on ``threads`` threads (default the worker's: 1, or ``worker_threads(client, n)``, which
``--threads N`` calls), so a worker's tasks do not oversubscribe its cores; the float results are
then the same as a single process on as many threads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rnnscope.errors import RnnscopeError
from rnnscope.store.docfields import with_fields
from rnnscope.store.shards import ShardBuild, write_shard

from .corpus import Documents, Frames, documents_of, frames_of, is_frames

DISTRIBUTED = "probe without --scheduler / --workers"


@dataclass(frozen=True)
class FromSpec:
    """What a worker loads the subject from: the command line's ``--model`` / ``--encoder`` / ``--loss``
    specs and ``--modules``, with the bytes of every ``file.py`` they name (``files``)."""
    model: str
    encoder: str | None = None
    loss: str | None = None
    modules: tuple | None = None
    files: tuple = ()           # (absolute path, sha256, bytes)
    frames: bool = False        # the model reads frames: it comes without an encoder

    @classmethod
    def of(cls, model: str, encoder=None, loss=None, modules=None) -> FromSpec:
        specs, files = [], []
        for spec in (model, encoder, loss):
            spec, found = _absolute(spec)
            specs.append(spec)
            files += found
        return cls(*specs, tuple(modules) if modules else None, tuple(files))

    def load(self):
        """``(subject, record options)`` on this worker; the same object for every task after the first."""
        if self not in _LOADED:
            from .specs import subject_and_options
            local = {p: _local_copy(p, sha, data) for p, sha, data in self.files}
            spec = {s: _replace(s, local) if s else s for s in (self.model, self.encoder, self.loss)}
            subject, asked = subject_and_options(spec[self.model], spec[self.encoder],
                                                 self.modules and list(self.modules), spec[self.loss],
                                                 frames=self.frames)
            _LOADED[self] = (subject, asked)
        return _LOADED[self]


_LOADED: dict = {}      # per worker process: FromSpec or Pickled -> (subject, options)


@dataclass(frozen=True)
class Pickled:
    """The subject pickled once on the client (cloudpickle), unpickled once per worker. The cluster moves
    these bytes, never the live model: a worker that fetched a model from a peer mid-record (work
    stealing) would otherwise get it with the peer's Probe still installed on its cells."""
    sha256: str
    data: bytes = dataclasses.field(repr=False, compare=False)

    @classmethod
    def of(cls, subject) -> Pickled:
        import cloudpickle
        data = cloudpickle.dumps(subject)
        return cls(hashlib.sha256(data).hexdigest(), data)

    def load(self):
        """``(subject, {})`` on this worker; the same object for every task after the first."""
        if self not in _LOADED:
            import pickle
            for old in [k for k in _LOADED if isinstance(k, Pickled)]:     # one record's subject at a time
                del _LOADED[old]
            _LOADED[self] = (pickle.loads(self.data), {})
        return _LOADED[self]


def _parts(spec: str):
    """The paths in a spec: the weights before ``@`` and a ``file.py`` before ``:fn``."""
    weights, at, rest = spec.rpartition("@")
    target, sep, _ = rest.rpartition(":")
    return ([weights] if at else []) + ([target] if sep and target.lower().endswith(".py") else [])


def _absolute(spec):
    """The spec with its local paths made absolute, and the (path, sha256, bytes) of its ``.py`` files."""
    if not spec or spec.startswith("zoo:"):
        return spec, []
    files, paths = [], _parts(spec)
    if not paths and Path(spec).exists():           # a checkpoint folder or an archive
        return str(Path(spec).resolve()), []
    for p in paths:
        if Path(p).exists():
            full = str(Path(p).resolve())
            spec = spec.replace(p, full, 1)
            if full.lower().endswith(".py"):
                data = Path(full).read_bytes()
                files.append((full, hashlib.sha256(data).hexdigest(), data))
    return spec, files


def _local_copy(path: str, sha: str, data: bytes) -> str:
    """``path`` if this worker sees the same file there (a shared file system), else a copy of it."""
    try:
        if hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha:
            return path
    except OSError:
        pass
    copy = Path(tempfile.gettempdir()) / "rnnscope-specs" / sha[:16] / Path(path).name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(data)
    return str(copy)


def _replace(spec: str, local: dict) -> str:
    for path, there in local.items():
        spec = spec.replace(path, there)
    return spec


_TASK_THREADS = [1]     # per worker process: the threads each rnnscope task runs on (``worker_threads``)


def task_threads(n: int | None = None) -> int:
    """Run this task's torch and numba on ``n`` threads (default: the worker's, set by ``worker_threads``,
    else 1); numba's count is per thread, so every task sets it. Returns the count."""
    import numba
    import torch
    n = _TASK_THREADS[0] if n is None else n
    torch.set_num_threads(n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return n


def _set_threads(n: int) -> None:
    """The worker's count for its rnnscope tasks; torch's is per process, so a task that sets none
    (the analysis's other reductions) runs on it too."""
    _TASK_THREADS[0] = n
    task_threads(n)


def worker_threads(client, n: int | None):
    """Make each rnnscope task on ``client``'s workers run torch and numba on ``n`` threads (``--threads``),
    until the returned undo is called; None leaves them at one. More threads than a worker's cores
    per task slot oversubscribe it; the float results are those of one process on ``n`` threads."""
    if n is None:
        return lambda: None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RnnscopeError(f"threads must be a whole number >= 1 (got {n!r})", "give --threads 1 or more")
    from distributed import WorkerPlugin

    class Threads(WorkerPlugin):
        """Every rnnscope task on the worker (one joining later too) uses ``n`` threads. Sent by value
        (a local class), so it sets the worker's own module by importing it there."""
        def setup(self, worker):
            from rnnscope.probe.distributed import _set_threads
            _set_threads(n)

        def teardown(self, worker):
            from rnnscope.probe.distributed import _set_threads
            _set_threads(1)
    client.register_plugin(Threads(), name="rnnscope-threads")
    return lambda: client.unregister_worker_plugin("rnnscope-threads")


def _shard_task(subject, part, build, index, expect, options, threads):
    """On a worker: record shard ``index`` (its documents ``part``: a ``Documents`` or ``Frames``, with
    their fields, the call's and loss's to read and the documents table's to keep) into ``build``."""
    from .recording import record
    task_threads(threads)
    subject, asked = subject.load() if isinstance(subject, (FromSpec, Pickled)) else (subject, {})

    def write(path):
        with contextlib.redirect_stdout(io.StringIO()):     # the size line of every shard: not the user's
            record(subject, part, path, progress=False, **asked, **options)
    return write_shard(Path(build), index, expect, write)


def _describe(v):
    """An option as the plan records it: a value, or what a function or object is (by name)."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v]
    if isinstance(v, dict):                 # attention={name: picker}
        return {str(k): _describe(x) for k, x in v.items()}
    named = v if hasattr(v, "__qualname__") else type(v)
    return f"{getattr(named, '__module__', '')}.{named.__qualname__}"


def record_on(client, subject, texts, out, *, spec: FromSpec | None = None, shard_docs: int | None = None,
              threads: int | None = None, overwrite: bool = False, progress: bool = True, carry: bool = False,
              **options):
    """``record`` on the Dask ``client``'s workers (see the module); returns the opened Run."""
    from distributed import as_completed
    from tqdm import tqdm

    from rnnscope.store import open_run

    from .attention import sources_of
    from .recording import model_checksum
    from .subject import subject_of
    if carry:
        raise RnnscopeError("--carry runs one state through every document, so the corpus cannot be split into "
                            "shards", f"{DISTRIBUTED}, or without --carry")
    if shard_docs is not None and shard_docs < 1:
        raise RnnscopeError(f"shard_docs must be >= 1 (got {shard_docs})", "give --shard-docs 1 or more")
    frames, sub = is_frames(texts), subject_of(subject)
    docs = frames_of(texts) if frames else documents_of(texts)
    with_fields(pd.DataFrame({"name": docs.names}), docs.fields)       # a field no table holds: refused before a task
    if options.get("attention") and len({bool(f.get("source")) for f in docs.fields}) > 1:
        sources_of(docs, None)          # some documents with a source, some without: its one line, before a task
    checksum = model_checksum(sub.model)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    size = shard_docs or max(1, math.ceil(len(docs) / (4 * workers)))   # a few shards a worker: a slow one is shared
    groups = [_part(docs, i, i + size) for i in range(0, len(docs), size)]
    expects = [{"text_sha256": hashlib.sha256("".join(getattr(g, "texts", [])).encode("utf-8", "surrogatepass"))
                .hexdigest(), "model_checksum": checksum, "names": list(g.names)} for g in groups]
    if spec is not None:            # the workers load these from the spec themselves
        options = {k: v for k, v in options.items() if k not in ("encode", "loss", "modules")}
        spec = dataclasses.replace(spec, frames=frames)
    options["source"] = options.get("source") or sub.source
    plan = {"model": checksum, "spec": spec and (spec.model, spec.encoder, spec.loss, spec.modules),
            "options": {k: _describe(v) for k, v in sorted(options.items())},
            "shards": [(e["text_sha256"], e["names"]) for e in expects],
            # a frames shard's text is empty: its frames and times say whether it is the same
            **({"frames": [_frames_digest(g) for g in groups]} if frames else {}),
            # a label changed in the corpus changes the loss and the documents table: not the same plan
            "fields": hashlib.sha256(json.dumps(docs.fields, sort_keys=True, default=repr).encode()).hexdigest()}
    build = ShardBuild(out, plan, overwrite=overwrite)
    entries = [build.reusable(i, e) for i, e in enumerate(expects)]
    todo = [i for i, e in enumerate(entries) if e is None]
    if len(todo) < len(groups):
        print(f"probe: reusing {len(groups) - len(todo)} of {len(groups)} shards finished by an earlier record")
    dashboard = client.scheduler_info().get("services", {}).get("dashboard")
    if dashboard and progress:
        print(f"probe: {len(groups)} shards of up to {size} documents on {workers} workers; "
              f"Dask dashboard at {client.dashboard_link}")
    futures = {}
    try:
        if todo:
            ship = spec if spec is not None else client.scatter(Pickled.of(sub), broadcast=True, hash=False)
            token = uuid.uuid4().hex[:8]
            futures = {client.submit(_shard_task, ship, groups[i], str(build.dir), i, expects[i],
                                     options, threads, key=f"rnnscope-shard-{i:05d}-{token}", pure=False): i
                       for i in todo}
        with tqdm(total=len(groups), initial=len(groups) - len(todo), unit="shard", desc="probe",
                  disable=not progress) as bar:
            for fut in as_completed(futures):
                entries[futures[fut]] = fut.result()
                bar.update()
    except KeyboardInterrupt:
        raise RnnscopeError(f"interrupted: no run was written to {out}; the finished shards are kept in {build.dir}",
                            "run the same command again to resume") from None
    except RnnscopeError:
        raise
    except Exception as err:        # a worker lost too often (KilledWorker), a scheduler gone: not the user's code
        said = (str(err).splitlines() or [""])[0][:160]
        raise RnnscopeError(f"the cluster failed while recording: {type(err).__name__}: {said}",
                            "run the same command again: finished shards are reused") from err
    finally:
        for f in futures:
            f.cancel()
    build.commit(entries, {})
    return open_run(out)


def _part(docs: Documents | Frames, start: int, end: int) -> Documents | Frames:
    """Documents ``start .. end - 1`` of ``docs``, as ``record`` takes them (one shard's)."""
    if isinstance(docs, Frames):
        return Frames(docs.names[start:end], docs.inputs[start:end], docs.times[start:end], docs.fields[start:end],
                      docs.source)
    return Documents(docs.names[start:end], docs.texts[start:end], docs.source, docs.fields[start:end])


def _frames_digest(part: Frames) -> str:
    """SHA-256 over a shard's frames and time stamps (their shapes and bytes, document by document)."""
    h = hashlib.sha256()
    for x, t in zip(part.inputs, part.times):
        for a in (x, t):
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def cluster_for(scheduler: str | None = None, workers: int | None = None, threads: int | None = None):
    """A Dask client: of the scheduler at ``scheduler``, or of a ``LocalCluster`` of ``workers`` processes
    on 127.0.0.1 started here and stopped on leaving; None when neither is given (one process). Its
    workers' rnnscope tasks run on ``threads`` threads each while it is held (``worker_threads``)."""
    if not scheduler and not workers:
        if threads is not None:
            raise RnnscopeError("--threads sets the threads of a cluster's tasks, and no cluster is given",
                                "add --scheduler ADDRESS or --workers N, or leave --threads out")
        yield None
        return
    with _client(scheduler, workers) as client:
        undo = worker_threads(client, threads)
        try:
            yield client
        finally:
            if scheduler:           # a cluster that outlives the command is left as it was
                undo()


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None):
    if scheduler and workers:
        raise RnnscopeError("both --scheduler and --workers given", "give --scheduler ADDRESS (a running cluster) "
                            "or --workers N (one started on this machine)")
    from distributed import Client, LocalCluster
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise RnnscopeError(f"no Dask scheduler answers at {scheduler} ({type(err).__name__})",
                                "start one (dask scheduler, dask-jobqueue) or pass --workers N") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client
