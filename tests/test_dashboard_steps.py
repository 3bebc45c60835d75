"""The dashboard and export over Runs whose steps are not characters: words with BOS/EOS steps, bytes
that share a character, several documents. The page layout is checked as pure functions; the
dashboard in a real browser and the exports on recorded Runs."""
import numpy as np
import pandas as pd
import pytest

from rnnscope.dashboards.steps import Documents, owners, page, page_chars, pieces, span_text
from rnnscope.errors import RnnscopeError

BOS, EOS = 1, 2


def docs_of(rows) -> Documents:
    return Documents(pd.DataFrame(rows, columns=["name", "char_start", "char_end", "step_start", "step_end"]))


# Two documents: "the cat sat" as BOS the cat sat EOS (steps 0..4), then "a dog" as a dog (steps 5..6).
TEXT = "the cat sat" + "a dog"
SPANS = np.array([(-1, -1), (0, 3), (4, 7), (8, 11), (-1, -1), (11, 12), (13, 16)], np.int64)
IDS = np.array([BOS, 10, 11, 12, EOS, 13, 14], np.int64)
DOCS = docs_of([("first", 0, 11, 0, 5), ("second", 11, 16, 5, 7)])


def test_a_page_draws_each_character_once_coloured_by_its_word_and_marks_bos_and_eos():
    s, e = page(DOCS, 0, 0, 100)
    assert (s, e) == (0, 5)                                    # the page stops at the document's end
    c0, c1 = page_chars(SPANS, DOCS, 0, s, e)
    assert (c0, c1) == (0, 11)
    drawn, steps, pos = pieces(TEXT, SPANS, IDS, s, e, c0, c1)
    assert drawn == ["\u27e8id 1\u27e9", *"the cat sat", "\u27e8id 2\u27e9"]
    assert steps.tolist() == [0, 1, 1, 1, -1, 2, 2, 2, -1, 3, 3, 3, 4]      # the spaces belong to no word
    assert pos.tolist() == [-1, *range(11), -1]
    assert page(DOCS, 1, 0, 100) == (5, 7)                       # the second document's page starts at its start


def test_pages_split_the_text_between_words_and_never_draw_a_character_twice():
    drawn_pages = []
    for s in range(0, 5, 2):                                     # windows of 2 steps over the first document
        s, e = page(DOCS, 0, s, 2)
        c0, c1 = page_chars(SPANS, DOCS, 0, s, e)
        drawn, steps, pos = pieces(TEXT, SPANS, IDS, s, e, c0, c1)
        assert all(s <= t < e for t in steps if t >= 0)
        drawn_pages.append([d for d, p in zip(drawn, pos) if p >= 0])
    assert drawn_pages == [list("the "), list("cat sat"), []]     # whitespace between pages: the earlier one's
    c0, c1 = page_chars(SPANS, DOCS, 1, 5, 7)
    assert (c0, c1) == (11, 16) and "".join(pieces(TEXT, SPANS, None, 5, 7, c0, c1)[0]) == "a dog"


def test_bytes_that_share_a_character_draw_it_once_coloured_by_the_last_byte():
    text = "h\u00e9!"                                         # é is two bytes: two steps, one character
    spans = np.array([(0, 1), (1, 2), (1, 2), (2, 3)], np.int64)
    assert owners(spans, 0, 4, 0, 3).tolist() == [0, 2, 3]
    drawn, steps, _ = pieces(text, spans, None, 0, 4, 0, 3)
    assert drawn == list(text) and steps.tolist() == [0, 2, 3]
    assert span_text(text, spans, 1, 3) == "\u00e9" and span_text(text, SPANS, 0, 1) == ""


def test_a_step_without_ids_is_marked_by_its_number_and_characters_owned_by_no_step_are_minus_one():
    drawn, steps, _ = pieces(TEXT, SPANS, None, 0, 2, *page_chars(SPANS, DOCS, 0, 0, 2))
    assert drawn[0] == "\u27e8step 0\u27e9" and steps.tolist() == [0, 1, 1, 1, -1]


def test_documents_are_found_by_name_or_index_and_a_wrong_one_is_one_line():
    assert DOCS.find("second") == 1 and DOCS.find(0) == 0 and DOCS.find("1") == 1
    assert [DOCS.of(t) for t in range(7)] == [0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(RnnscopeError, match="no document 'third'") as err:
        DOCS.find("third")
    assert "\n" not in str(err.value) and "first, second" in str(err.value)


# ---- Recorded Runs: a word-level LM over three documents, and an encoder with BOS/EOS steps ----------

import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from browser import column, get, served, set_prop, wait_for_model, wait_until  # noqa: E402
from test_cli import one_line_error, rnnscope  # noqa: E402

browser_only = pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")
HOSTILE = "<img src=x onerror=self['__pwned']=7>$$x$$"
DOCUMENTS = {"first": "the cat sat on the mat\nthe end",
             HOSTILE: "a dog ran  to the park\nand the dog sat",
             "third": "on and on the cat ran"}


class Words:
    """A whitespace tokenizer with its own vocabulary (the word_language_model shape); ``marks`` adds a
    BOS and an EOS step, which have no text."""

    def __init__(self, marks: bool = False):
        words = sorted({w for t in DOCUMENTS.values() for w in t.split()})
        self.index = {w: i + 3 for i, w in enumerate(words)}          # 0 pad, 1 BOS, 2 EOS
        self.marks, self.size = marks, len(words) + 3

    def encode(self, text: str):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        ids = [self.index[text[a:b]] for a, b in spans]
        if self.marks:
            ids, spans = [BOS, *ids, EOS], [(-1, -1), *spans, (-1, -1)]
        return torch.tensor(ids), np.array(spans, np.int64)


class WordLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.rnn = nn.Embedding(vocab, 8), nn.LSTM(8, 16, 2, batch_first=True)
        self.head = nn.Linear(16, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rnnscope.probe import record
    root = tmp_path_factory.mktemp("steps")
    words = Words()
    record(WordLM(words.size), DOCUMENTS, root / "words", encode=words, dtype="float32", progress=False)
    marked = Words(marks=True)
    record(WordLM(marked.size), DOCUMENTS, root / "marked", encode=marked, loss=None, dtype="float32",
           progress=False)
    return root


def _cell_xy(driver, index: int) -> tuple[float, float]:
    """Where cell ``index`` of the text view is on the screen, in CSS pixels."""
    return driver.execute_script("""const doc = Bokeh.documents[0], s = doc.get_model_by_name('text_source');
        const view = Bokeh.index.get_one(doc.get_model_by_name('text_plot'));
        const col = (c) => s.data.get ? s.data.get(c) : s.data[c], i = arguments[0];
        const r = view.canvas_view.el.getBoundingClientRect();
        return [r.left + view.frame.x_scale.compute(col('x')[i]), r.top + view.frame.y_scale.compute(col('y')[i])];""",
                                 index)


def _hover(driver, index: int) -> str:
    """The tooltip's text with the mouse over cell ``index``."""
    x, y = _cell_xy(driver, index)
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
    return wait_until(lambda: driver.execute_script("""const out = [];
        const walk = (root) => { for (const el of root.querySelectorAll('*')) {
          if (String(el.className).includes('bk-tooltip-content') && el.innerText) out.push(el.innerText);
          if (el.shadowRoot) walk(el.shadowRoot); } };
        walk(document); return out.join('\\n');"""))


def _safe(driver):
    assert driver.execute_script("return window.__pwned === undefined")
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@browser_only
def test_pick_the_second_document_see_its_words_coloured_and_hover_a_word(runs, driver):
    from rnnscope.probe import open_run
    run = open_run(runs / "words")
    with served(runs / "words") as (url, _):
        driver.get("about:blank")
        driver.get_log("browser")
        driver.get(url)
        wait_for_model(driver, "text_source")
        labels = [label for _, label in get(driver, "document", "options")]
        assert len(labels) == 3 and labels[1] == f"1: {HOSTILE}"          # a Select's labels are text, never HTML
        set_prop(driver, "document", "value", "1")
        doc = run.documents.iloc[1]
        wait_until(lambda: "park" in "".join(column(driver, "lines_source", "line")))
        chars, steps, pos = (column(driver, "text_source", c) for c in ("char", "step", "pos"))
        text = run.text[doc.char_start:doc.char_end]
        assert "".join(c for c, p in zip(chars, pos) if p >= 0) == text.replace("\n", "\u21b5")
        lines = column(driver, "lines_source", "line")
        assert [line.rstrip("\u21b5") for line in lines] == text.split("\n")    # whitespace laid out as ever
        key, index = get(driver, "unit_key", "value"), get(driver, "unit_index", "value")
        values, alpha = column(driver, "text_source", "value"), column(driver, "text_source", "alpha")
        for c, t, p, v, a in zip(chars, steps, pos, values, alpha):
            if c == " " or c == "\u21b5":
                assert t == -1 and a == 0                          # whitespace no word covers: uncoloured
            else:
                assert run.spans[t, 0] <= p < run.spans[t, 1] and a == 1
                assert v == pytest.approx(float(run[key][t, index]), rel=1e-6)
        info = get(driver, "unit_info", "text")
        assert f"steps {doc.step_start}&ndash;{doc.step_end}" in info and "&lt;img" in info and "<img" not in info
        word = next(i for i, (c, p) in enumerate(zip(chars, pos)) if p == doc.char_start + text.index("park"))
        step = steps[word]
        time.sleep(0.5)
        png = driver.get_screenshot_as_png()
        tip = _hover(driver, word + 2)                               # the middle of "park"
        assert "park" in tip and str(int(run.ids[step])) in tip and f"{values[word]:.4f}" in tip
        assert "next-token loss" in tip
        from io import BytesIO
        from PIL import Image
        x, y = _cell_xy(driver, word + 2)
        pixel = np.asarray(Image.open(BytesIO(png)).convert("RGB"))[int(y) - 8, int(x)].astype(int)
        from rnnscope.dashboards.figures import PALETTE
        level = column(driver, "text_source", "shade")[word]
        want = PALETTE[min(int((level + 1) / 2 * len(PALETTE)), len(PALETTE) - 1)]
        want = np.array([int(want[i:i + 2], 16) for i in (1, 3, 5)])
        assert np.abs(pixel - want).max() <= 12, (pixel, want)   # the word in its unit's colour on screen
        _safe(driver)


@browser_only
def test_bos_and_eos_steps_are_marked_cells_with_their_ids_and_no_loss_track(runs, driver):
    from rnnscope.probe import open_run
    run = open_run(runs / "marked")
    assert run.loss is None
    with served(runs / "marked") as (url, _):
        driver.get("about:blank")
        driver.get_log("browser")
        driver.get(url)
        wait_for_model(driver, "text_source")
        chars, steps, edge = (column(driver, "text_source", c) for c in ("char", "step", "edge"))
        doc = run.documents.iloc[0]
        assert chars[0] == "\u27e8id 1\u27e9" and chars[-1] == "\u27e8id 2\u27e9"
        assert steps[0] == doc.step_start and steps[-1] == doc.step_end - 1
        assert edge[0] == edge[-1] == 1 and sum(edge) == 2
        lines = column(driver, "lines_source", "line")
        assert lines[0].startswith("\u27e8id 1\u27e9the cat") and lines[-1].endswith("end\u27e8id 2\u27e9")
        tip = _hover(driver, 0)
        assert "\u27e8id 1\u27e9" in tip and "loss" not in tip
        html = driver.execute_script("return Array.from(Bokeh.documents[0].all_models)"
                                     ".filter(m => m.constructor.__name__ === 'Div').map(m => m.text).join(' ')")
        assert "--grad" in html                                # gradient flow: says how to record it
        _safe(driver)


def test_pages_turn_within_a_document_and_on_into_the_next(runs):
    from rnnscope.dashboards.app import RunData
    from rnnscope.dashboards.state import Selection
    data = RunData(runs / "marked", window=4)
    sel = data.first_selection()
    docs = data.docs
    seen = []
    for _ in range(12):
        s, e = data.span(sel)
        seen.append((sel.document, s, e))
        assert docs.step_start[sel.document] <= s < e <= docs.step_end[sel.document]
        sel.set(**data.turn(sel, +1))
    starts = [s for _, s, _ in seen]
    assert starts == sorted(starts) and seen[-1][2] == len(data.run)   # forward through every step to the end
    assert {d for d, _, _ in seen} == {0, 1, 2}
    assert seen[1][1] == 4 and seen[2][0] == 0 and seen[3][0] == 1 and seen[3][1] == docs.step_start[1]
    back = Selection(sel.key, 0, int(docs.step_start[1]), None, 1)
    back.set(**data.turn(back, -1))
    assert back.document == 0 and data.span(back)[1] == docs.step_end[0]    # back into the last page before


def test_export_draws_one_document_by_name_or_index_in_steps(runs, tmp_path):
    from rnnscope.probe import open_run
    run = open_run(runs / "words")
    key = next(k for k in run.keys() if k.endswith(".c"))
    rnnscope("export", runs / "words", "--unit", f"{key}:3", "--document", "1", "--out", tmp_path / "d.html")
    page = (tmp_path / "d.html").read_text()
    assert "a dog ran  to the park" in page and "the cat sat on the mat" not in page
    assert "<img src=x" not in page                                     # the hostile name is JSON data only
    rnnscope("export", runs / "words", "--unit", f"{key}:3", "--document", "third", "--start", "1", "--end", "4",
             "--out", tmp_path / "t.html")
    page = (tmp_path / "t.html").read_text()
    assert "and on the" in page and "on and on" not in page            # steps 1..4 of the third document
    rnnscope("export", runs / "words", "--units", f"{key}:1,{key}:2", "--document", "third", "--out",
             tmp_path / "h.html")
    assert '"step"' in (tmp_path / "h.html").read_text()                # the heatmap's axis counts steps
    one_line_error(rnnscope("export", runs / "words", "--unit", f"{key}:3", "--document", "fourth", "--out",
                            tmp_path / "x.html", check=False), "no document 'fourth'")
    one_line_error(rnnscope("export", runs / "words", "--unit", f"{key}:3", "--start", "2", "--end", "9", "--out",
                            tmp_path / "x.html", check=False), "pick one with --document")
    assert not (tmp_path / "x.html").exists()


@browser_only
def test_export_png_colours_each_word(runs, tmp_path):
    from PIL import Image
    key = next(k for k in (runs / "marked" / "states").iterdir()).name.removesuffix(".npy")
    rnnscope("export", runs / "marked", "--unit", f"{key}:0", "--document", "1", "--out", tmp_path / "w.png")
    img = np.asarray(Image.open(tmp_path / "w.png").convert("RGB"))
    assert img.shape[1] > 600 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_context_rows_bracket_the_steps_whole_token_and_mark_steps_without_text():
    import pandas as pd
    from rnnscope.dashboards.queries import context_rows
    t = pd.DataFrame({"unit": ["a.l0.h:0"] * 3, "side": ["top"] * 3, "rank": [0, 1, 2], "value": [1.0, 0.5, 0.2],
                      "step": [4, 9, 0], "offset": [2, 1, 0], "context": ["the park is", "a dog", "hi"],
                      "token_start": [4, 2, -1], "token_end": [8, 5, -1]})
    rows = context_rows(t, "a.l0.h:0")
    assert rows["context"] == ["the [park] is", "a [dog]", "hi [no text]"]
    old = t.drop(columns=["token_start", "token_end"])         # a table written before steps: one char per step
    assert context_rows(old, "a.l0.h:0")["context"][:2] == ["th[e] park is", "a[ ]dog"]
