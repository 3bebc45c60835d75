"""Issue 24, the exported page: a Run's document names and a table's feature names reach the HTML
``<title>`` (and the figure's own title) escaped, on one line, and cut to a readable length."""
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import char_model
from rnnscope.cli import main
from rnnscope.probe import record
from rnnscope.zoo import Vocab

HOSTILE = "</title><script>alert(1)</script>\u202e\x1b[2J"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    ck = char_model("lstm", Vocab("ab\ncd ()"), hidden=4)
    run = record(ck, {HOSTILE + "x" * 100_000: "ab (cd)\n" * 6, "b": "(ab)\n" * 6},
                 tmp_path_factory.mktemp("export") / "run", progress=False).path
    feature = HOSTILE + "y" * 5000          # a neurons table someone else wrote
    (run / "analysis").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame({
        "unit": ["rnn.l0.h:0"], "key": ["rnn.l0.h"], "layer": [0], "kind": ["h"], "index": [0], "feature": [feature],
        "metric": ["auc"], "direction": [1], "score": [0.9], "heldout_score": [0.8], "q_value": [0.01],
        "strength": [0.5]})), run / "analysis" / "neurons.parquet")
    return run, feature


def _title(path) -> str:
    titles = re.findall(r"<title>(.*?)</title>", path.read_text(), re.S)
    assert len(titles) == 1, titles
    return titles[0]


@pytest.mark.parametrize("what", ["unit", "feature"])
def test_the_exported_pages_title_is_escaped_and_cut(hostile_run, tmp_path, what, capsys):
    run, feature = hostile_run
    out = tmp_path / "x.html"
    flags = ["--unit", "rnn.l0.h:1"] if what == "unit" else ["--feature", feature, "--top", "1"]
    assert main(["export", str(run), *flags, "--document", "0", "--out", str(out)]) == 0, capsys.readouterr().err
    title = _title(out)
    assert "<" not in title and "\x1b" not in title and "\u202e" not in title and "\n" not in title
    assert "&lt;/title&gt;&lt;script&gt;" in title and "⟨U+202E⟩" in title      # shown, as text
    assert len(title) < 400
