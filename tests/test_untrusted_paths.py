"""Issue 24, paths: a Run's manifest never names a file rnnscope opens, and nothing is read or written
through a link out of a watch log or a checkpoint."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from rnnscope import probe, zoo
from rnnscope.analysis.report import analyze
from rnnscope.errors import RnnscopeError
from rnnscope.store.watchlog import SCHEMAS, WatchLogWriter, open_watch_log

TEXT = "if (a) {\n\tb(c, d);\n}\n" * 20
MODEL = {"class": "M", "checksum": "0", "modules": {"rnn": {"type": "GRU", "layers": 1, "hidden": 4,
                                                            "bidirectional": False}}}
KEYS = ["rnn.l0.grad_h"]


def one_line(excinfo, *words) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and " — " in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def probed(tmp_path, tiny_checkpoint):
    """A Run probed from a checkpoint directory, with gradients (its manifest names that directory)."""
    run = probe.record(zoo.load(tiny_checkpoint), TEXT, tmp_path / "run", grad=True, progress=False,
                       source=str(tiny_checkpoint))
    assert json.loads((run.path / "manifest.json").read_text())["model"]["source"] == str(tiny_checkpoint)
    return run.path


def _source(run_dir, source):
    m = json.loads((run_dir / "manifest.json").read_text())
    m["model"]["source"] = source
    (run_dir / "manifest.json").write_text(json.dumps(m))


# ---- a Run's manifest never names a path to open -------------------------------------------------

def test_the_model_for_decay_comes_from_the_command_line_not_from_the_manifest(probed, tiny_checkpoint):
    out = analyze(probed, features=["column"], shifts=4, max_lag=10, positions=8, contexts=2, progress=False,
                  log=lambda *_: None)
    assert "grad_decay" not in out and "does not open from a Run's manifest" in out["summary"]["skipped"]["grad_decay"]
    assert {"neurons", "grad_norms", "saturation", "contexts"} <= set(out)        # the rest ran in full
    out = analyze(probed, features=["column"], shifts=4, max_lag=10, positions=8, contexts=2, progress=False,
                  checkpoint=str(tiny_checkpoint), log=lambda *_: None)
    assert len(out["grad_decay"]) and "grad_decay" not in out["summary"]["skipped"]


@pytest.mark.parametrize("source", ["/etc", "/root", "/dev/zero", "../../../etc/passwd", "x.py:build"])
def test_a_manifest_source_naming_a_system_path_is_never_opened(probed, source):
    _source(probed, source)
    out = analyze(probed, features=["column"], shifts=4, max_lag=10, positions=8, contexts=2, progress=False,
                  ablation=True, log=lambda *_: None)
    skipped = out["summary"]["skipped"]
    assert "pass --checkpoint" in skipped["grad_decay"] and "pass --checkpoint" in skipped["ablation"]
    assert {"neurons", "grad_norms", "contexts"} <= set(out)


def test_a_fifo_named_by_the_manifest_does_not_hang_analyze(probed, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    _source(probed, str(tmp_path / "fifo"))
    out = analyze(probed, features=["column"], shifts=4, contexts=0, progress=False, log=lambda *_: None)
    assert "pass --checkpoint" in out["summary"]["skipped"]["grad_decay"]


# ---- watch logs: no read or write through a link ---------------------------------------------------

def _block(step: int) -> dict:
    empty = {n: SCHEMAS[n].empty_table().to_pandas() for n in SCHEMAS}
    empty["steps"] = pd.DataFrame({"step": [step], "wall": [0.0], "loss": [1.0], "loss_finite": [True],
                                   "grad_norm": [1.0], "grad_norm_after": [1.0], "clipped": [False], "clips": [0],
                                   "flags": [""]})
    empty["decay"] = pd.DataFrame({"step": [step] * 3, "key": KEYS * 3, "lag": [0, 1, 2], "norm": [1.0, .5, .25]})
    return empty


def _log(path, steps=(0, 1)):
    w = WatchLogWriter(path, 1, MODEL, KEYS)
    for s in steps:
        w.append(_block(s))
    w.close()
    return path


def test_a_watch_log_whose_blocks_link_elsewhere_is_refused(tmp_path):
    _log(tmp_path / "other", steps=(5, 6, 7))
    log = _log(tmp_path / "log")
    assert len(open_watch_log(log).steps) == 2
    shutil.rmtree(log / "blocks")
    (log / "blocks").symlink_to(tmp_path / "other" / "blocks")
    with pytest.raises(RnnscopeError) as e:
        open_watch_log(log)
    one_line(e, "points outside the watch log")


def test_a_linked_watch_json_is_refused(tmp_path):
    _log(tmp_path / "other")
    log = _log(tmp_path / "log")
    (log / "watch.json").unlink()
    (log / "watch.json").symlink_to(tmp_path / "other" / "watch.json")
    with pytest.raises(RnnscopeError) as e:
        open_watch_log(log)
    one_line(e, "watch.json", "outside the watch log")


def test_a_linked_lock_never_makes_a_writer_create_a_file_outside_the_log(tmp_path):
    log = _log(tmp_path / "log")
    (log / ".lock").unlink()
    (log / ".lock").symlink_to(tmp_path / "planted")
    with pytest.raises(RnnscopeError) as e:
        WatchLogWriter(log, 1, MODEL, KEYS)
    one_line(e, ".lock", "symbolic link")
    assert not (tmp_path / "planted").exists()
    (log / ".lock").unlink()
    (log / "blocks").rename(tmp_path / "blocks")
    (log / "blocks").symlink_to(tmp_path / "blocks")             # a link that would be written through
    with pytest.raises(RnnscopeError) as e:
        WatchLogWriter(log, 1, MODEL, KEYS)
    one_line(e, "symbolic link")
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == sorted(
        ["000000000000-000000000000.arrow", "000000000001-000000000001.arrow"])


# ---- checkpoints -----------------------------------------------------------------------------------

def test_a_checkpoint_whose_weights_link_outside_its_folder_is_refused(tmp_path, tiny_checkpoint):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(tiny_checkpoint / "weights.safetensors", elsewhere)
    (tiny_checkpoint / "weights.safetensors").symlink_to(elsewhere)
    with pytest.raises(RnnscopeError) as e:
        zoo.load(tiny_checkpoint)
    one_line(e, "weights.safetensors", "outside the checkpoint's folder")
    (tiny_checkpoint / "weights.safetensors").unlink()
    (tiny_checkpoint / "w.safetensors").symlink_to(elsewhere)     # a link inside the folder is the folder's
    shutil.move(elsewhere, tiny_checkpoint / "real.safetensors")
    (tiny_checkpoint / "weights.safetensors").symlink_to("real.safetensors")
    assert isinstance(zoo.load(tiny_checkpoint).model, torch.nn.Module)


def test_a_huge_safetensors_header_is_refused_before_it_is_parsed(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file
    ck = zoo.load(tiny_checkpoint)
    state = {k: v.contiguous() for k, v in ck.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"junk": "x" * (90 << 20)})
    with pytest.raises(RnnscopeError) as e:
        zoo.load(tmp_path / "w.safetensors", arch="lstm", vocab=ck.vocab.chars, embed=8, hidden=16, layers=2)
    msg = one_line(e, "safetensors header of 94,")
    assert len(msg) < 400
    save_file(state, str(tmp_path / "ok.safetensors"))
    got = zoo.load(tmp_path / "ok.safetensors", arch="lstm", vocab=ck.vocab.chars, embed=8, hidden=16, layers=2)
    assert all(np.array_equal(got.model.state_dict()[k], v) for k, v in state.items())
