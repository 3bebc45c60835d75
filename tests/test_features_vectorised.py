"""The vectorised feature tracks equal the character loops they replaced (kept here as the reference),
on real code and prose and on the edge cases of each rule."""
import glob
import os

import numpy as np
import pytest
from pygments.token import Keyword, Punctuation

from rnnscope import zoo
from rnnscope.analysis import features as F

TEXTS = [(zoo.SAMPLES / "linux.c").read_text(), (zoo.SAMPLES / "python.py").read_text()]
STDLIB = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:12]
EDGES = ["", "\n", "\n\n", '"', '""', '\\"', 'a"b\\"c"d', '"open\n\nclosed"', '"a\n"b', "\t", " \t \t x",
         "\t\tx\n    y\n\n\t  \tz", " " * 200 + "x\n\t" * 3, "\t" * 70 + "x", "x\n", "\n\t", "if (a) b;",
         "if(a(b)c) { if (d) }", "if", "if (", "if (((", "x = if_ (y)", "/* if (x) */ if (y) z;"]


def _quotes_loop(text):
    out, inside = np.zeros(len(text), np.int8), False
    for t, ch in enumerate(text):
        if ch == "\n" and t > 0 and text[t - 1] == "\n":
            inside = False
        elif text[t] == '"' and not (t and text[t - 1] == "\\"):
            inside = not inside
        out[t] = inside
    return out


def _indent_loop(text):
    starts = F._line_starts(text)
    widths = {}
    for s in np.unique(starts):
        line = text[s:text.find("\n", s) if "\n" in text[s:] else len(text)]
        widths[s] = len(line[: len(line) - len(line.lstrip(" \t"))].expandtabs(F.TAB))
    return np.array([widths[s] for s in starts], np.int64)


def _if_loop(text):
    mask, toks = np.zeros(len(text), np.int8), F._tokens(text, "c")
    for n, (i, tok, v) in enumerate(toks):
        if v == "if" and tok in Keyword:
            rest = [m for m in range(n + 1, min(n + 4, len(toks))) if toks[m][2].strip()]
            if not rest or toks[rest[0]][2] != "(" or toks[rest[0]][1] not in Punctuation:
                continue
            depth, start = 0, toks[rest[0]][0]
            for j, tj, vj in toks[rest[0]:]:
                if tj in Punctuation:
                    depth += vj.count("(") - vj.count(")")
                if depth <= 0:
                    mask[start:j] = 1
                    break
    return mask


@pytest.mark.parametrize("text", TEXTS + [open(p).read() for p in STDLIB] + EDGES)
def test_tracks_equal_the_character_loops(text):
    assert np.array_equal(F.in_double_quotes(text), _quotes_loop(text))
    assert np.array_equal(F.indent(text), _indent_loop(text))
    assert np.array_equal(F.in_if_condition(text), _if_loop(text))


def test_mutations_are_caught():
    """The comparison can fail: an escaped quote counted, or a tab taken as one column, differs."""
    text = 'a "b\\"c" d\n\tx'
    assert not np.array_equal(_quotes_loop(text), _quotes_loop(text.replace("\\", "")))
    assert not np.array_equal(F.indent(text), F.indent(text.replace("\t", " ")))
