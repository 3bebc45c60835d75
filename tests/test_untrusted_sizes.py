"""Issue 24, sizes and the terminal: every count from someone else's table or log, and every count on
the command line, is checked before memory or time is spent; what reaches the terminal is escaped
and cut to a readable length."""
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnnscope import argtypes as T
from rnnscope.analysis.report import unit_contexts
from rnnscope.errors import RnnscopeError
from rnnscope.store.tables import SCHEMAS, read_parquet
from rnnscope.store.watchlog import SCHEMAS as WATCH_SCHEMAS
from rnnscope.store.watchlog import WatchLogWriter, open_watch_log

from test_untrusted_paths import KEYS, MODEL, _block

N = 5_000_000


def _contexts_table(n: int) -> pa.Table:
    kinds = {"string": pa.string(), "integer": pa.int64(), "float": pa.float64(), "floats": pa.list_(pa.float64())}
    cols = {c: pa.nulls(n, kinds[k]) if k == "floats" else pa.array(["rnn.l0.h" if c == "key" else "rnn.l0.h:0" if c == "unit" else ""] * n) if k == "string"
            else pa.array(np.zeros(n, kinds[k].to_pandas_dtype())) for c, k in SCHEMAS["contexts"].items()}
    return pa.table(cols)


def test_a_table_of_millions_of_rows_is_refused_from_its_footer(tmp_path):
    path = tmp_path / "contexts.parquet"
    pq.write_table(_contexts_table(N), path)
    assert path.stat().st_size < 5 << 20                   # small on disk: it is the rows that cost
    t = time.perf_counter()
    with pytest.raises(RnnscopeError, match="5,000,000 rows") as e:
        read_parquet(path, SCHEMAS["contexts"], "contexts")
    assert "\n" not in str(e.value) and time.perf_counter() - t < 5
    pq.write_table(_contexts_table(1000), path)             # a table of its size still reads
    assert len(read_parquet(path, SCHEMAS["contexts"], "contexts")) == 1000


def _log_with(tmp_path, bad: dict):
    w = WatchLogWriter(tmp_path / "log", 1, MODEL, KEYS)
    w.append(bad)
    w.append(_block(1))
    w.close()
    return tmp_path / "log"


def test_a_watch_block_with_an_absurd_lag_is_refused_not_sized(tmp_path):
    bad = _block(0)
    bad["decay"].loc[1, "lag"] = 10 ** 12
    with pytest.raises(RnnscopeError, match="lag 1000000000000 is not a position") as e:
        open_watch_log(_log_with(tmp_path, bad))
    assert "\n" not in str(e.value)


def test_a_watch_block_whose_table_column_is_not_text_is_a_wrong_schema(tmp_path):
    log = _log_with(tmp_path, _block(0))
    block = sorted((log / "blocks").glob("*.arrow"))[-1]
    table = pa.table({"table": pa.array([1, 2]), "step": pa.array([1, 1])})
    with pa.OSFile(str(block), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_ = open_watch_log(log)
    assert len(log_.steps) == 1                          # the last block dropped, with one warning saying why
    assert any("'table' column holds int64" in str(c.message) for c in caught)


@pytest.mark.parametrize("flag,value", [("--length", "1000000000"), ("--seeds", "100000000"),
                                        ("--chars", "10000000000"), ("--positions", "100000000"),
                                        ("--exponents", "10000000"), ("--max-lag", "1000000000000")])
def test_counts_that_size_memory_or_time_are_bounded(flag, value):
    with pytest.raises(Exception, match="must be at most") as e:
        T.int_at_least(1, flag)(value)
    assert "run out of memory or time" in str(e.value)
    with pytest.raises(Exception, match="must be at least 1"):
        T.int_at_least(1, flag)("0")
    assert T.int_at_least(1, flag)("300") == 300


def test_generate_with_a_billion_characters_is_refused_before_the_model_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", "generate", str(tmp_path / "absent"), "--prime",
                           "a", "--length", "1000000000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--length" in proc.stderr and "at most" in proc.stderr


def test_unit_contexts_escape_the_side_and_cut_a_megabyte_context():
    context = "x" * 500_000 + "\x1b]0;pwned\x07" + "y" * 500_000
    rows = pd.DataFrame({"unit": ["rnn.l0.h:0"] * 2, "side": ["\x1b[2Jtop", "bottom\u202e"], "rank": [0, 0],
                         "step": [3, 4], "value": [1.0, -1.0], "offset": [500_000, 3], "context": [context, "ab\ncd"]})
    out = unit_contexts(rows, "rnn.l0.h:0")
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b[2Jtop" in out and "bottom\\u202e" in out and "ab\\ncd" in out.replace("[", "").replace("]", "")
    assert max(len(line) for line in out.splitlines()) < 1000


def test_an_empty_keys_list_in_watch_json_is_named(tmp_path):
    import json
    log = _log_with(tmp_path, _block(0))
    m = json.loads((log / "watch.json").read_text())
    (log / "watch.json").write_text(json.dumps({**m, "keys": []}))
    with pytest.raises(RnnscopeError, match="'keys' is not a non-empty list") as e:
        open_watch_log(log)
    assert "None" not in str(e.value)


def _compressed_block(path, batches: int, pad: int = 4 << 20) -> None:
    """A block of ``batches`` identical record batches of 4 decay rows, each row padded with ``pad``
    zeros in a column the reader ignores, zstd-compressed: tiny on disk."""
    cols = {f.name: pa.nulls(4, f.type) for t in WATCH_SCHEMAS.values() for f in t}
    cols.update(table=["decay"] * 4, step=[0] * 4, key=KEYS * 4, lag=[0] * 4, norm=[0.0] * 4, pad=["0" * pad] * 4)
    batch = pa.RecordBatch.from_pydict(cols)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(
            sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        for _ in range(batches):
            w.write_batch(batch)


def test_a_compressed_watch_block_is_sized_before_it_is_unpacked(tmp_path):
    log = _log_with(tmp_path, _block(0))
    bomb = sorted((log / "blocks").glob("*.arrow"))[0]          # the first block: not one a kill tears
    _compressed_block(bomb, batches=40)                         # 40 x 16 MB of zeros: 640 MB unpacked
    assert bomb.stat().st_size < 2 << 20
    os.utime(bomb, ns=(0, 0))             # written first, as it was: a bad block before the last is an error
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    with pytest.raises(RnnscopeError, match="unpacks to 671,[0-9,]+ bytes") as e:
        open_watch_log(log)
    assert "\n" not in str(e.value) and pool.bytes_allocated() - before < 1 << 20
    _compressed_block(bomb, batches=2, pad=1000)               # a compressed block of its size reads
    os.utime(bomb, ns=(0, 0))
    assert len(open_watch_log(log).decay) == 8 + 3


def test_documents_parquet_is_bounded_by_the_manifests_count_from_its_footer(tmp_path, tiny_checkpoint):
    from rnnscope import probe, zoo
    from rnnscope.store.run import open_run
    run = probe.record(zoo.load(tiny_checkpoint), "ab\ncd\n" * 4, tmp_path / "run", progress=False).path
    docs = pq.read_table(run / "documents.parquet")            # one document: the manifest says 1
    with pq.ParquetWriter(run / "documents.parquet", docs.schema) as w:     # 4M copies of it, a small file
        copies = docs.take(np.zeros(100_000, np.int64))
        for _ in range(40):
            w.write_table(copies)
    t = time.perf_counter()
    with pytest.raises(RnnscopeError, match="footer declares 4,000,000 documents but the manifest says 1") as e:
        open_run(run)
    assert "\n" not in str(e.value) and "rnnscope probe" in str(e.value) and time.perf_counter() - t < 2


@pytest.fixture(scope="module")
def contexts_run(tmp_path_factory):
    """A recorded Run and its real contexts table."""
    from rnnscope import probe
    from rnnscope.analysis.contexts import top_contexts
    from rnnscope.store.tables import write_table
    from conftest import char_model
    from rnnscope.zoo import Vocab
    ck = char_model("lstm", Vocab("ab\ncd ()"), hidden=4)
    run = probe.record(ck, "ab (cd)\n" * 20, tmp_path_factory.mktemp("ctx") / "run", progress=False)
    write_table(run, "contexts", top_contexts(run, k=3, window=6, progress=False))
    return run.path


@pytest.mark.parametrize("column,value,words", [
    ("step", np.nan, "'step' holds a missing or non-whole value"),
    ("rank", 1.5, "'rank' holds a missing or non-whole value"),
    ("offset", np.inf, "'offset' holds a missing or non-whole value"),
    ("context", None, "'context' holds a missing value"),
    ("side", None, "'side' holds a missing value"),
    ("token_start", "3", "column 'token_start' holds (large_)?string, expected integer"),
    ("token_end", np.nan, "'token_end' holds a missing or non-whole value")])
def test_a_contexts_table_with_a_missing_or_mistyped_value_is_refused_when_read(contexts_run, tmp_path, column,
                                                                                value, words):
    import shutil

    from rnnscope.analysis.report import unit_report
    from rnnscope.store.run import open_run
    from rnnscope.store.tables import read_table
    run = tmp_path / "run"
    shutil.copytree(contexts_run, run)
    frame = pq.read_table(run / "analysis" / "contexts.parquet").to_pandas()
    frame[column] = frame[column].astype(object if isinstance(value, str) or value is None else float)
    frame.loc[frame.index[1], column] = value
    if isinstance(value, str):
        frame[column] = frame[column].astype(str)
    pq.write_table(pa.Table.from_pandas(frame), run / "analysis" / "contexts.parquet")
    for read in (lambda: read_table(run, "contexts"), lambda: unit_report(open_run(run), frame["unit"][1], 3)):
        with pytest.raises(RnnscopeError, match=words) as e:
            read()
        assert "\n" not in str(e.value) and "contexts.parquet" in str(e.value)


def test_a_watch_log_refresh_reads_only_the_blocks_written_since(tmp_path):
    """Incremental: once read, a block is not read again (here an old block damaged after the open does
    not stop a refresh), and the new block's rows join the tables."""
    w = WatchLogWriter(tmp_path / "log", 1, MODEL, KEYS)
    for s in range(5):
        w.append(_block(s))
    log = open_watch_log(tmp_path / "log")
    assert len(log.steps) == 5 and log.refresh() == 0
    sorted((tmp_path / "log" / "blocks").glob("*.arrow"))[1].write_bytes(b"damaged after it was read")
    w.append(_block(5))
    w.close()
    assert log.refresh() == 1 and list(log.steps.step) == [0, 1, 2, 3, 4, 5] and len(log.decay) == 18
    with pytest.raises(RnnscopeError, match="unreadable"):       # a fresh open reads every block again
        open_watch_log(tmp_path / "log")
