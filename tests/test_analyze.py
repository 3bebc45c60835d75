"""`rnnscope analyze` end to end: tables written into the Run, the top table printed, what is
skipped said, and bad input answered in one line."""
import json
import shutil

import pandas as pd
import pytest
import torch

from rnnscope.analysis.report import read_table
from rnnscope.probe import open_run
from test_cli import one_line_error, rnnscope
from rnnscope.zoo import Architecture, CharModel, Vocab, save

CODE = "if (a, b) {\n\t/* c d */\n\tx(\"e f\", g);\n}\n" * 60


@pytest.fixture
def c_checkpoint(tmp_path):
    """A small random LSTM whose vocabulary covers C comments and strings."""
    torch.manual_seed(0)
    vocab = Vocab("".join(sorted(set(CODE))))
    return save(CharModel(Architecture("lstm", len(vocab), 8, 16, 2)), vocab, {"name": "tiny-c"}, tmp_path / "ck")


def test_analyze_writes_every_table(tmp_path, c_checkpoint):
    text = tmp_path / "t.c"
    text.write_text(CODE)
    run_dir = tmp_path / "run"
    rnnscope("probe", c_checkpoint, "--text", text, "--out", run_dir, "--grad")
    proc = rnnscope("analyze", run_dir, "--max-lag", "20", "--shifts", "8", "--sparse", "--ablate",
                    "--controls", "5", "--checkpoint", c_checkpoint, "--language", "c")   # its card names no corpus
    assert "top units per feature" in proc.stdout and "in_comment" in proc.stdout
    assert "gradient half-life" in proc.stdout
    run = open_run(run_dir)
    tables = {n: read_table(run, n) for n in ("neurons", "saturation", "grad_norms", "grad_decay",
                                              "half_lives", "sparse", "ablation")}
    assert all(isinstance(t, pd.DataFrame) and len(t) for t in tables.values()), \
        [n for n, t in tables.items() if t is None]
    n = tables["neurons"]
    assert {"unit", "key", "index", "feature", "score", "heldout_score", "p_value", "q_value"} <= set(n.columns)
    assert n["key"].nunique() == 12            # every state key of the 2-layer LSTM, no gradient keys
    assert len(tables["grad_norms"]) == len(CODE)
    assert set(tables["saturation"]["gate"]) == {"i", "f", "o"}
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    # nothing skipped but a feature the text never varies (the code has no square brackets)
    assert summary["skipped"] == {"feature bracket_depth": "constant on the scored steps (0)"}
    assert not list((run_dir / "analysis").glob(".*"))            # no temporaries left behind


def test_analyze_says_what_it_skipped_and_refuses_the_wrong_model(tmp_path, c_checkpoint):
    text = tmp_path / "t.c"
    text.write_text(CODE)
    run_dir = tmp_path / "run"
    rnnscope("probe", c_checkpoint, "--text", text, "--out", run_dir, "--kinds", "h,c")
    moved = tmp_path / "elsewhere"
    shutil.move(c_checkpoint, moved)
    proc = rnnscope("analyze", run_dir, "--features", "in_comment,column", "--shifts", "4")
    assert "skipped saturation: no gates recorded" in proc.stdout
    assert "skipped grad_norms: no gradients recorded (probe with --grad)" in proc.stdout
    assert "skipped grad_decay: the Run was probed from" in proc.stdout and "pass --checkpoint" in proc.stdout
    rnnscope("analyze", run_dir, "--features", "column", "--checkpoint", moved, "--max-lag", "10")
    assert read_table(open_run(run_dir), "half_lives") is not None
    one_line_error(rnnscope("analyze", run_dir, "--checkpoint", "zoo:lstm-linux", check=False),
                   "not the model this Run was recorded with")
    one_line_error(rnnscope("analyze", tmp_path / "nope", check=False), "no run at")
    one_line_error(rnnscope("analyze", run_dir, "--features", "wiggles", check=False), "unknown feature")
