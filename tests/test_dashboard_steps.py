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
