"""Text that is not ASCII and Runs of many documents (issue 20): wide characters (CJK, full-width
punctuation) take two columns each, so colour and hover stay on their character; long lines wrap;
the document picker is searchable and paged; tables are wide enough for what they hold. The layout
as pure functions; a Chinese Run in a real browser."""
import shutil
import unicodedata

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from browser import column, get, served, set_prop, wait_for_model, wait_until

CHINESE = {"第一": "模型读中文，每个字一步！abc 中文def\n" + "长" * 200 + "\n结束。",
           "第二": "一行。"}


def test_wide_characters_take_two_columns_and_the_text_after_them_does_not_drift():
    from rnnscope.dashboards.figures import WRAP, layout
    cells, lines, wide = layout(list("ab中，c\n" + "长" * 100))
    assert cells["w"][:5].tolist() == [1, 1, 2, 2, 1]
    assert cells["x"][:5].tolist() == [0, 1, 2.5, 4.5, 6]              # "c" sits after two wide cells
    assert lines["line"][0] == "ab    c\u21b5"                             # each wide glyph is drawn on its own
    assert wide["char"][:2] == ["中", "，"] and wide["x"][:2].tolist() == [2.5, 4.5]
    edges = cells["x"] + cells["w"] / 2
    assert edges.max() <= WRAP and len(lines["line"]) == 3                # 100 wide characters wrap once
    assert (cells["y"][6:] == -1).sum() == WRAP // 2


def test_document_search_and_pages():
    from rnnscope.dashboards.picker import PICK, listed
    from rnnscope.dashboards.steps import Documents
    names = [f"mm/file_{i:05d}.c" for i in range(3000)] + ["第二章"]
    docs = Documents(pd.DataFrame({"name": names, "char_start": 0, "char_end": 1, "step_start": 0, "step_end": 1}))
    assert len(docs.search("")) == 3001 and docs.search("FILE_0299").tolist() == list(range(2990, 3000))
    assert docs.search("第二").tolist() == [3000] and docs.search("7").tolist()[:2] == [7, 17]
    assert listed(docs.search(""), PICK, 5)[:2] == [5, PICK]            # the shown document is always listed
    assert len(listed(docs.search(""), 0, 5)) == PICK


def test_tables_are_wide_enough_for_a_whole_unit_name():
    from rnnscope.dashboards.views import text_width
    assert text_width(["lstm.l0_reverse.c:22", "a.l0.h:1"]) >= 7 * len("lstm.l0_reverse.c:22")
    assert text_width(["中文" * 10]) >= text_width(["ab" * 10]) * 1.8


class Chars:
    """One step per character over the Chinese text's own alphabet."""

    def __init__(self):
        self.alphabet = sorted({c for t in CHINESE.values() for c in t})
        self.index = {c: i for i, c in enumerate(self.alphabet)}

    def encode(self, text: str):
        return torch.tensor([self.index[c] for c in text]), np.stack([np.arange(len(text)),
                                                                       np.arange(1, len(text) + 1)], 1)


class CharLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lstm = nn.Embedding(vocab, 8), nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    from rnnscope.probe import record
    chars = Chars()
    return record(CharLM(len(chars.alphabet)), CHINESE, tmp_path_factory.mktemp("zh") / "run", encode=chars,
                  dtype="float32", progress=False)


def _hover(driver, index):
    from test_dashboard_steps import _hover as hover
    return hover(driver, index)


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")
def test_hover_lands_on_the_chinese_character_under_the_mouse(chinese, driver):
    from test_dashboard import _open
    with served(chinese.path) as (url, _):
        _open(driver, url)
        wait_for_model(driver, "text_source")
        chars, widths = column(driver, "text_source", "char"), column(driver, "text_source", "w")
        assert [int(w) for w in widths[:4]] == [2, 2, 2, 2]
        assert all(int(w) == (2 if unicodedata.east_asian_width(c) in "WF" else 1)
                   for c, w in zip(chars, widths) if len(c) == 1 and c != " ")
        drawn = column(driver, "wide_source", "char")
        assert drawn[:5] == list("模型读中文")
        key, index = get(driver, "unit_key", "value"), get(driver, "unit_index", "value")
        for target in ("！", "中", "f"):                 # after 12 wide characters, and after ASCII again
            i = chars.index(target) if target != "中" else chars.index("中", chars.index("c"))
            tip = _hover(driver, i)
            assert target in tip and f"{float(chinese[key][i, index]):.4f}" in tip, (target, tip)
        xs, wide_x = column(driver, "text_source", "x"), column(driver, "wide_source", "x")
        bang = chars.index("！")
        assert wide_x[drawn.index("！")] == xs[bang]                  # its ink is centred on its own cell
        lines = column(driver, "lines_source", "line")
        assert lines[0].index("def") + 2 == xs[chars.index("f")]     # and the ASCII after it did not drift
        assert len(lines) >= 4                                         # the long line wraps in the view
        set_prop(driver, "document", "value", "1")                    # a one-line document
        wait_until(lambda: column(driver, "wide_source", "char") == list("一行。"))
        height = driver.execute_script("return Bokeh.documents[0].get_model_by_name('text_plot').frame_height")
        from rnnscope.dashboards.figures import MIN_ROWS, ROW
        assert height >= MIN_ROWS * ROW                                # room for the colour bar's labels
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_feature_heatmap_names_its_feature_and_document_and_draws_the_feature_itself(tmp_path):
    """An analysed Run of two documents: the export's title names both, its top row is the feature
    (in_comment, 1 inside the comment), and 3,000 steps get a figure at least 3,000 pixels wide."""
    from rnnscope.dashboards.export import feature_figure
    from test_cli import rnnscope
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.c").write_text("int x; /* a comment here */ int y;\n" * 100)
    (tmp_path / "docs" / "b$$x$$.c").write_text("/* b */ int z = 1;\n" * 200)
    rnnscope("probe", "zoo:gru-linux", "--text", tmp_path / "docs", "--out", tmp_path / "run", "--kinds", "h")
    rnnscope("analyze", tmp_path / "run", "--shifts", "2", "--max-lag", "30", "--features", "in_comment")
    fig = feature_figure(tmp_path / "run", "in_comment", 3, 0, 3000, document="a.c")
    assert "in_comment" in fig.title.text.text and "document a.c" in fig.title.text.text
    assert type(fig.title.text).__name__ == "PlainText" and fig.width >= 3000
    labels = list(fig.yaxis.major_label_overrides.values())
    assert [lab.text for lab in labels][0] == "feature in_comment" and len(labels) == 4
    image = fig.renderers[0].data_source.data["image"][0][::-1]        # rows top first
    from rnnscope.analysis.features import in_comment
    want = np.asarray(in_comment("int x; /* a comment here */ int y;\n" * 100), np.float64)[:3000]
    assert 0 < want.mean() < 1 and np.array_equal(image[0] > 0, want > 0)     # the feature, step by step
    fig = feature_figure(tmp_path / "run", "in_comment", 3, document=1, own_row=False)
    assert "b$$x$$.c" in fig.title.text.text and len(fig.yaxis.major_label_overrides) == 3
