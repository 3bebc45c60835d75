"""The user's own features from the command line and from Python, written into the Run and drawn by
export; the built-ins that run by default follow the Run (a zoo C model's lexer only for a zoo C
model); a skipped feature is one line, not a warning with our file and line."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.analysis import features as F
from rnnscope.analysis.report import analyze

ROOT = Path(__file__).parents[1]
TEXT = ('int main(void) {\n    if (x > 0) { puts("hi, there"); }\n    return 0; /* done */\n}\n' * 40)


class Tagger(nn.Module):
    """A char GRU whose unit 0 is planted to be 1 on vowels (its input weight) and nothing else."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 8)
        self.rnn = nn.GRU(8, 6, batch_first=True)
        with torch.no_grad():
            vowel = torch.zeros(128)
            vowel[[ord(c) for c in "aeiou"]] = 1.0
            self.embed.weight[:, 0] = vowel * 8 - 4          # the embedding says vowel / not
            self.rnn.weight_ih_l0.zero_()
            self.rnn.weight_hh_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
            self.rnn.weight_ih_l0[6 + 0, 0] = -4.0           # z of unit 0 low: h follows n
            self.rnn.weight_ih_l0[12 + 0, 0] = 4.0           # n of unit 0 = tanh(+-16)

    def forward(self, ids):
        return self.rnn(self.embed(ids))[0]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[min(ord(c), 127) for c in text]])


def vowel(text: str) -> np.ndarray:
    return np.array([c in "aeiou" for c in text], float)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "run"
    rs.record(rs.Subject(Tagger(), encode, loss=None), TEXT, path, dtype="float32", progress=False)
    return path


@pytest.fixture(scope="module")
def feats_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("feats") / "feats.py"
    path.write_text(textwrap.dedent('''
        import numpy as np
        def features():
            return {"vowel": lambda s: np.array([c in "aeiou" for c in s], float),
                    "never": lambda s: np.zeros(len(s))}
        def digit(text):
            return np.array([c.isdigit() for c in text], float)
        def spaced():
            return {"in comment": lambda s: np.zeros(len(s))}
        def shadowing():
            return {"column": lambda s: np.zeros(len(s))}
        def three():
            return 3
        def words():
            return {"vowel": lambda s: np.array(["a"] * len(s))}
        def broken():
            return {"boom": lambda s: 1 / 0}
    '''))
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnscope.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_features_from_the_command_line_reach_the_run_the_table_and_the_export(user_run, feats_file, tmp_path):
    got = cli("analyze", user_run, "--features", f"{feats_file}:features,{feats_file}:digit", "--contexts", "0")
    assert got.returncode == 0, got.stderr
    assert "skipped feature never: constant on the scored steps (0)" in got.stdout
    assert "Warning" not in got.stderr and "warnings.warn" not in got.stderr and ".py:" not in got.stderr
    neurons = pd.read_parquet(user_run / "analysis" / "neurons.parquet")
    scored = set(neurons["feature"])
    assert {"vowel", "digit"} <= scored and "never" not in scored
    assert set(F.LANGUAGE_FREE) & scored and not set(F.CODE) & scored      # the Run's defaults beside them
    best = rs.analysis.top_units(neurons.query("feature == 'vowel'"), 1).iloc[0]
    assert best["unit"] in ("rnn.l0.h:0", "rnn.l0.n:0") and best["heldout_score"] > 0.99   # the planted unit
    stored = pd.read_parquet(user_run / "analysis" / "features.parquet")
    assert list(stored.columns) == ["step", "vowel", "never", "digit"]
    np.testing.assert_array_equal(stored["vowel"], vowel(TEXT))
    np.testing.assert_array_equal(stored["step"], np.arange(len(TEXT)))
    summary = json.loads((user_run / "analysis" / "summary.json").read_text())
    assert "vowel" in summary["features"] and "feature never" in summary["skipped"]
    html = tmp_path / "vowel.html"
    out = cli("export", user_run, "--feature", "vowel", "--top", "3", "--out", html)
    assert out.returncode == 0, out.stderr
    assert "feature vowel" in html.read_text()                            # its own row, from the Run
    from rnnscope.dashboards.export import feature_values
    from rnnscope.dashboards.steps import Documents
    run = rs.open_run(user_run)
    np.testing.assert_array_equal(feature_values(run, "vowel", Documents(run.documents), 0, 5, 50), vowel(TEXT)[5:50])


def test_the_default_built_ins_follow_the_run(user_run, tmp_path):
    mine = analyze(user_run, decay=False, contexts=0, progress=False)
    assert set(mine["neurons"]["feature"]) <= set(F.LANGUAGE_FREE)
    assert mine["summary"]["features"] == sorted(set(F.LANGUAGE_FREE) - set(mine["summary"]["skipped"]))
    asked = analyze(user_run, language="c", decay=False, contexts=0, progress=False)
    assert {"in_comment", "in_string", "paren_depth"} <= set(asked["neurons"]["feature"])
    named = analyze(user_run, features=["in_comment"], decay=False, contexts=0, progress=False)
    assert set(named["neurons"]["feature"]) == {"in_comment"}        # a built-in named always runs
    ck = rs.load("zoo:rnn-linux")
    zoo = rs.record(ck, TEXT[:1500], tmp_path / "zoo", progress=False)
    assert {"in_comment", "paren_depth"} <= set(analyze(zoo, decay=False, contexts=0, progress=False)
                                                ["neurons"]["feature"])


def test_in_python_analyze_writes_the_users_features_into_the_run(user_run):
    out = rs.analyze(user_run, features=["column"], own={"vowel": vowel,
                                                         "is_e": F.on_tokens(lambda ts: [t == "e" for t in ts])},
                     decay=False, contexts=0, sparse=True, progress=False)
    assert set(out["neurons"]["feature"]) == {"column", "vowel", "is_e"}
    assert set(out["sparse"]["feature"]) == {"column", "vowel", "is_e"}
    stored = rs.store.read_table(rs.open_run(user_run), "features")
    np.testing.assert_array_equal(stored["is_e"], [c == "e" for c in TEXT])
    with pytest.raises(rs.RnnscopeError, match="built-in's name"):
        rs.analyze(user_run, own={"column": vowel}, decay=False, contexts=0, progress=False)


def test_analyze_calls_the_users_feature_once(user_run):
    """The values scored and the values stored come from one call of the user's code per document."""
    calls = []
    counted = lambda text: (calls.append(len(text)), vowel(text))[1]                # noqa: E731
    out = rs.analyze(user_run, own={"vowel": counted}, decay=False, contexts=0, progress=False)
    assert len(calls) == len(rs.open_run(user_run).documents)
    stored = rs.store.read_table(rs.open_run(user_run), "features")
    np.testing.assert_array_equal(stored["vowel"], vowel(TEXT))
    assert out["neurons"].query("feature == 'vowel'")["selection_score"].max() > 0.99   # the planted unit


@pytest.mark.parametrize("spec, said", [
    ("nosuch.py:features", "does not exist"),
    ("{f}:missing", "has no attribute 'missing'"),
    ("{f}:spaced", "is not a name"),
    ("{f}:shadowing", "built-in's name"),
    ("{f}:three", "is a int, not a function"),
    ("{f}:words", "gave <U1 values"),
    ("{f}:broken", "feature 'boom' failed: ZeroDivisionError"),
    ("in comment", "is not a name"),
    ("{f}:", "is not file.py:function"),
])
def test_a_bad_feature_is_one_line_and_writes_nothing(user_run, feats_file, spec, said):
    before = {p: p.stat().st_mtime_ns for p in (user_run / "analysis").glob("*")} \
        if (user_run / "analysis").exists() else {}
    got = cli("analyze", user_run, "--features", spec.format(f=feats_file), "--contexts", "0")
    assert got.returncode == 2, got.stderr
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnscope: error:") and said in lines[0], got.stderr
    assert before == {p: p.stat().st_mtime_ns for p in (user_run / "analysis").glob("*")}


def test_a_feature_given_per_step_as_an_array_scores_as_its_function(user_run):
    """Steps that are not characters (audio frames, a label computed elsewhere) take a feature as an
    array of one number per step; it scores exactly as the function that gives the same values."""
    run = rs.open_run(user_run)
    as_array = rs.find_neurons(run, {"vowel": vowel(TEXT)}, progress=False)
    as_function = rs.find_neurons(run, {"vowel": vowel}, progress=False)
    pd.testing.assert_frame_equal(as_array, as_function)
    with pytest.raises(rs.RnnscopeError, match=r"shape \[10\] for 3280 steps"):
        rs.find_neurons(run, {"vowel": np.zeros(10)}, progress=False)
