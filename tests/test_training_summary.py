"""How far the gradient reaches through time as training goes, read from a watch log: planted decays with
known half-lives and reaches, clipping events counted across blocks, and an old block without 'clips'."""
import math

import numpy as np
import pandas as pd
import pyarrow as pa

from test_dashboard_watch import EVERY, KEYS, MODEL, block

from rnnscope.analysis.training import chosen_steps, first_below, training_summary
from rnnscope.store.watchlog import WatchLogWriter, open_watch_log


def test_planted_decays_give_their_half_life_and_reach(tmp_path):
    w = WatchLogWriter(tmp_path / "log", EVERY, MODEL, KEYS)
    w.append(block(0, 3, clipped={10}))                  # steps 0 10 20: rate 0.8 * (1 + step/1000)
    w.append(block(30, 2, clipped={30, 40}))
    w.close()
    table = training_summary(open_watch_log(tmp_path / "log"), points=10, floor=0.01)
    assert sorted(table.step.unique()) == [0, 10, 20, 30, 40] and set(table.key) == set(KEYS)
    for row in table.itertuples():
        r = 0.8 * (1 + row.step / 1000)
        lags = np.arange(row.lags)
        assert row.lag_to_1pct == lags[r ** lags < 0.01][0] if (r ** lags < 0.01).any() else math.isnan(row.lag_to_1pct)
        k = math.ceil(math.log(0.5) / math.log(r))            # first lag below 1/2, then linear between k-1 and k
        assert abs(row.crossing_half_life - (k - 1 + (r ** (k - 1) - 0.5) / (r ** (k - 1) - r ** k))) < 1e-9
    clips = table.drop_duplicates("step").set_index("step").clips_so_far
    assert clips.to_dict() == {0: 0, 10: 1, 20: 1, 30: 2, 40: 3}       # counted across blocks
    assert (table.loss == 3 - table.step / 1000).all()


def test_a_block_written_before_clips_existed_reads_as_zero_clips(tmp_path):
    w = WatchLogWriter(tmp_path / "log", EVERY, MODEL, KEYS)
    w.append(block(0, 2, clipped={10}))
    w.close()
    path = next((tmp_path / "log" / "blocks").glob("*.arrow"))
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    old = table.drop_columns(["clips"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, old.schema) as out:
        out.write_table(old)
    steps = open_watch_log(tmp_path / "log").steps
    assert steps.clips.tolist() == [0, 0] and steps.clipped.tolist() == [False, True]


def test_helpers():
    assert first_below(np.array([1, 0.5, 0.009, 0.001]), 0.01) == 2
    assert math.isnan(first_below(np.ones(5), 0.01))
    assert chosen_steps(np.arange(0, 1000, 10), 3) == [0, 500, 990]
    assert chosen_steps([5, 0, 5], 6) == [0, 5]
    assert training_summary(type("L", (), {"decay": pd.DataFrame(), "steps": pd.DataFrame()})()).empty


def test_analyze_on_a_watch_log_prints_the_reach_table(tmp_path):
    from test_cli import one_line_error, rnnscope
    w = WatchLogWriter(tmp_path / "log", EVERY, MODEL, KEYS)
    w.append(block(0, 3, clipped={10}))
    w.close()
    out = rnnscope("analyze", tmp_path / "log").stdout
    lines = [line.split() for line in out.splitlines()[2:]]
    assert len(lines) == 3 * len(KEYS) and {row[1] for row in lines} == set(KEYS)
    assert [int(r[5]) for r in lines if r[0] == "20"] == [1] * len(KEYS)        # the clip at step 10, so far
    (tmp_path / "log" / "watch.json").write_text("{")
    one_line_error(rnnscope("analyze", tmp_path / "log", check=False), "")


def test_export_draws_a_watch_log_to_png(tmp_path):
    import shutil
    import pytest
    from test_cli import one_line_error, rnnscope
    if not shutil.which("chromedriver"):
        pytest.skip("needs chromium and chromium-driver")
    w = WatchLogWriter(tmp_path / "log", EVERY, MODEL, KEYS)
    w.append(block(0, 3, clipped={10}))
    w.close()
    rnnscope("export", tmp_path / "log", "--out", tmp_path / "t.png", "--key", KEYS[1])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(rnnscope("export", tmp_path / "log", "--out", tmp_path / "u.png", "--key", "nope.l0.grad_h",
                            check=False), "nope.l0.grad_h")
    assert not (tmp_path / "u.png").exists()
