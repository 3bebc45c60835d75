"""Feature tracks against independent references: Python's own tokenizer, a C scanner written
here, and properties that must hold on any text."""
import io
import tokenize

import numpy as np
import pytest

from rnnscope import zoo
from rnnscope.analysis import features as F
from rnnscope.zoo import RnnscopeError

C_TEXT = (zoo.SAMPLES / "linux.c").read_text()
PY_TEXT = (zoo.SAMPLES / "python.py").read_text()


def _python_reference(text, kind):
    """Mask of tokenize's STRING or COMMENT tokens, each token's closing character excluded for strings."""
    lines = text.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(l) for l in lines])
    mask = np.zeros(len(text), np.int8)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == kind:
            a = offsets[tok.start[0] - 1] + tok.start[1]
            b = offsets[tok.end[0] - 1] + tok.end[1]
            mask[a:b - (1 if kind == tokenize.STRING else 0)] = 1
    return mask




def test_python_strings_and_comments_match_the_python_tokenizer():
    assert np.array_equal(F.in_string(PY_TEXT, "python"), _python_reference(PY_TEXT, tokenize.STRING))
    assert np.array_equal(F.in_comment(PY_TEXT, "python"), _python_reference(PY_TEXT, tokenize.COMMENT))


def _c_reference(text):
    """A small C scanner: strings, char literals, block and line comments, preprocessor lines."""
    s, c = np.zeros(len(text), np.int8), np.zeros(len(text), np.int8)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("/*", i):
            j = text.find("*/", i + 2) + 2
            c[i:j - 1] = 1
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            c[i:j] = 1
            i = j + 1
        elif text[i] == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            s[i:j] = 1
            i = j + 1
        elif text[i] == "'":
            j = i + 1
            while text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        elif text[i] == "#" and (i == 0 or text[i - 1] == "\n"):
            while i < n and not (text[i] == "\n" and text[i - 1] != "\\"):
                if text.startswith("/*", i) or text.startswith("//", i):
                    break
                i += 1
        else:
            i += 1
    return s, c


def test_c_strings_and_comments_match_an_independent_scanner():
    want_s, want_c = _c_reference(C_TEXT)
    got_s, got_c = F.in_string(C_TEXT), F.in_comment(C_TEXT)
    assert want_s.sum() > 500 and want_c.sum() > 2000        # the sample has both
    assert np.array_equal(got_s, want_s)
    assert np.array_equal(got_c, want_c)


def test_brackets_balance_over_whole_functions_and_ignore_strings():
    assert F.brace_depth(C_TEXT)[-1] == 0 and F.paren_depth(C_TEXT)[-1] == 0
    assert F.brace_depth(C_TEXT).max() >= 2
    assert F.paren_depth('f("(((", x)\n').tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_if_condition_spans_nested_parentheses():
    text = "if (a(b) && c) x(); while (d) y;"
    m = F.in_if_condition(text)
    assert text[np.flatnonzero(m).min():np.flatnonzero(m).max() + 1] == "(a(b) && c"
    assert F.in_if_condition(C_TEXT).sum() > 100


def test_line_tracks_agree_with_line_lengths():
    text = C_TEXT[:3000]
    col, left = F.column(text), F.to_line_end(text)
    start = 0
    for line in text.split("\n")[:-1]:
        span = slice(start, start + len(line))
        assert np.all(col[span] + left[span] == len(line) + 1)
        assert col[start + len(line)] == 0                    # after reading the newline
        start += len(line) + 1
    assert F.indent("\tx\n    y\n")[[0, 3, 7]].tolist() == [8, 4, 4]


def test_quotes_in_prose_skip_apostrophes_and_elisions():
    text = "He said 'tis a 'fine' day, don't you? \"Yes\" quoth o'er."
    single = F.in_single_quotes(text)
    assert "".join(c for c, m in zip(text, single) if m) == "'fine"
    double = F.in_double_quotes(text)
    assert "".join(c for c, m in zip(text, double) if m) == '"Yes'


def test_compute_takes_names_and_callables_and_refuses_bad_ones():
    df = F.compute("ab\ncd\n", ["column", "to_line_end"])
    assert list(df.columns) == ["column", "to_line_end"] and len(df) == 6
    df = F.compute("ab\n", {"is_b": lambda s: np.array([c == "b" for c in s])})
    assert df["is_b"].tolist() == [False, True, False]
    with pytest.raises(RnnscopeError, match="unknown feature.*'nope'"):
        F.compute("ab", ["nope"])
    with pytest.raises(RnnscopeError, match="'short' gave shape \\[1\\] for a text of 2"):
        F.compute("ab", {"short": lambda s: np.zeros(1)})
    with pytest.raises(RnnscopeError, match="text is empty"):
        F.compute("", ["column"])
    with pytest.warns(UserWarning, match="'in_string' is constant"):
        F.compute("abc", ["in_string"])
