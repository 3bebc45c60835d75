"""Feature tracks: per-character arrays computed from the text alone.

Every track gives, for each position t, the state of the text *after reading character t*, which is
what the network's state at step t can know: the opening quote is inside the quote, the closing
quote is outside; ``column`` is 0 after reading a newline.

A feature is any function ``text -> array[time]``; ``compute(text, features)`` takes built-in names
or a dict of name -> callable. Code tracks (strings, comments, brackets, ``if`` conditions) come
from a real lexer (pygments), not regular expressions.

On a Run whose steps are not characters (words, subwords, BOS/EOS, several documents) the tracks
are still computed per character, on each document's own text (a quote left open in one document
does not run into the next), and a step takes the value at the last character of its span: the
state after reading it (``steps``). A step without text gets NaN and is left out of every score.
A feature of the tokens themselves is ``on_tokens(fn)``: ``fn(tokens) -> array[steps]``, given
every step's text ('' for BOS, EOS, padding).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from functools import lru_cache

import numpy as np
import pandas as pd
from pygments.lexers import get_lexer_by_name
from pygments.token import Comment, Keyword, Punctuation, String

from rnnscope.errors import RnnscopeError, call_user, escaped

TAB = 8
LONG_LEAD = 64      # indent: past this many leading blanks a line is expanded as a string
ELISIONS = ("'tis", "'twas", "'twere", "'twill", "'twixt", "'tween", "'em", "'gainst", "'d ", "'s ", "'ll ")


def clear_cache() -> None:
    """Forget the lexed texts (the last 8 texts' tokens are kept, for a view that asks again): what a
    benchmark calls so that each search it times lexes its text, as a first search does."""
    for cached in (_tokens, _token_table, _code_chars):
        cached.cache_clear()


@lru_cache(maxsize=8)
def _tokens(text: str, language: str) -> tuple:
    try:
        lexer = get_lexer_by_name(language, stripnl=False, stripall=False, ensurenl=False)
    except Exception:
        raise RnnscopeError(f"no lexer for language {language!r}", "use a pygments name such as c or python") from None
    return tuple((i, tok, v) for i, tok, v in lexer.get_tokens_unprocessed(text))


@lru_cache(maxsize=8)
def _token_table(text: str, language: str) -> tuple:
    """The tokens as arrays: ``starts``, ``ends [tokens]``, each one's ``kind`` (an index into
    ``types``, the distinct token types in order of appearance). A question about a token type (is it
    a string?) is then asked once per type, not once per token (pygments' ``in`` is a Python call)."""
    toks = _tokens(text, language)
    types: dict = {}
    starts = np.fromiter((i for i, _, _ in toks), np.int64, len(toks))
    ends = starts + np.fromiter((len(v) for _, _, v in toks), np.int64, len(toks))
    kind = np.fromiter((types.setdefault(t, len(types)) for _, t, _ in toks), np.int64, len(toks))
    return starts, ends, kind, tuple(types)


def _of_types(text: str, language: str, test) -> tuple:
    """``starts, ends`` of the tokens whose type passes ``test``, and the per-token boolean."""
    starts, ends, kind, types = _token_table(text, language)
    hit = np.array([bool(test(t)) for t in types], bool)[kind] if types else np.zeros(0, bool)
    return starts, ends, hit


def _cover(n: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``[n]`` int8: 1 inside any of the (non-overlapping) spans ``[starts, ends)``."""
    edge = np.zeros(n + 1, np.int64)
    np.add.at(edge, starts, 1)
    np.add.at(edge, ends, -1)
    return (np.cumsum(edge[:n]) > 0).astype(np.int8)


def _span_mask(text: str, language: str, inside, terminators: str) -> np.ndarray:
    """1 on runs of tokens for which ``inside(token)``; the run's last character is 0 when it closes the
    span (a quote, the ``/`` of ``*/``, a newline), since after reading it the span is over. An empty
    token ends a run, as any other token does."""
    starts, ends, hit = _of_types(text, language, inside)
    hit &= ends > starts
    mask = _cover(len(text), starts[hit], ends[hit])
    last = hit & ~np.r_[hit[1:], False]                     # the last token of each run
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    closing = np.isin(chars, [ord(ch) for ch in terminators])
    at = ends[last] - 1
    mask[at[closing[at]]] = 0
    return mask


def in_string(text: str, language: str = "c") -> np.ndarray:
    """Inside a string literal (not a character literal), from the lexer."""
    return _span_mask(text, language, lambda t: t in String and t not in String.Char, "\"'")


def in_comment(text: str, language: str = "c") -> np.ndarray:
    """Inside a comment (not a preprocessor line), from the lexer."""
    return _span_mask(text, language, lambda t: t in Comment and t not in Comment.Preproc
                      and t not in Comment.PreprocFile and t is not Comment.Hashbang, "/\n")


@lru_cache(maxsize=8)
def _code_chars(text: str, language: str) -> np.ndarray:
    """1 where a character is code: not in a string, comment or character literal (read-only: the
    three depth tracks share it)."""
    starts, ends, hit = _of_types(text, language, lambda tok: tok in String or tok in Comment)
    mask = 1 - _cover(len(text), starts[hit], ends[hit])
    mask.setflags(write=False)
    return mask


def _depth(text: str, open_: str, close: str, language: str | None) -> np.ndarray:
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    step = (chars == ord(open_)).astype(np.int64) - (chars == ord(close))
    if language:
        step *= _code_chars(text, language)
    return np.maximum(np.cumsum(step), 0)


def paren_depth(text: str, language: str = "c") -> np.ndarray:
    return _depth(text, "(", ")", language)


def bracket_depth(text: str, language: str = "c") -> np.ndarray:
    return _depth(text, "[", "]", language)


def brace_depth(text: str, language: str = "c") -> np.ndarray:
    return _depth(text, "{", "}", language)


def in_if_condition(text: str, language: str = "c") -> np.ndarray:
    """Inside the parentheses of ``if (...)``: from after the ``(`` to before its matching ``)``."""
    mask = np.zeros(len(text), np.int8)
    toks = _tokens(text, language)
    for n in (n for n, (_, _, v) in enumerate(toks) if v == "if"):
        if toks[n][1] not in Keyword:
            continue
        rest = [m for m in range(n + 1, min(n + 4, len(toks))) if toks[m][2].strip()]
        if not rest or toks[rest[0]][2] != "(" or toks[rest[0]][1] not in Punctuation:
            continue
        depth, start = 0, toks[rest[0]][0]
        for m in range(rest[0], len(toks)):          # an index, not toks[rest[0]:]: that copied the rest each time
            j, tj, vj = toks[m]
            if tj in Punctuation:
                depth += vj.count("(") - vj.count(")")
            if depth <= 0:
                mask[start:j] = 1
                break
    return mask


def _quote_toggle(text: str, is_quote) -> np.ndarray:
    out = np.zeros(len(text), np.int8)
    inside = False
    for t, ch in enumerate(text):
        if ch == "\n" and t > 0 and text[t - 1] == "\n":
            inside = False          # a paragraph break closes a quote left open
        elif is_quote(t, inside):
            inside = not inside
        out[t] = inside
    return out


def in_double_quotes(text: str) -> np.ndarray:
    """Between double quotes (prose or code); a backslash-escaped quote does not count. A paragraph
    break (a newline after a newline) closes a quote left open. The parity of the quotes since the last
    paragraph break, as ``_quote_toggle`` walks it character by character."""
    chars = _chars(text)
    quote = (chars == ord('"')) & ~np.r_[False, chars[:-1] == ord("\\")]
    reset = (chars == 10) & np.r_[False, chars[:-1] == 10]
    seen = np.cumsum(quote)
    at_reset = np.maximum.accumulate(np.where(reset, seen, 0))   # quotes counted up to the last break
    return ((seen - at_reset) & 1).astype(np.int8)


def in_single_quotes(text: str) -> np.ndarray:
    """Between single quotation marks in prose. An apostrophe inside a word (don't, o'er) or
    starting a known elision ('tis, 'em) is not a quotation mark."""
    lower = text.lower()

    def is_quote(t: int, inside: bool) -> bool:
        if text[t] != "'":
            return False
        before = text[t - 1] if t else " "
        after = text[t + 1] if t + 1 < len(text) else " "
        if before.isalnum() and after.isalnum():
            return False                                   # don't, o'er
        if not inside:
            return not before.isalnum() and not lower.startswith(ELISIONS, t)
        return not after.isalnum()                         # a closing mark ends a word
    return _quote_toggle(text, is_quote)


def _line_starts(text: str) -> np.ndarray:
    """For each t, the index of the first character of its line (a newline belongs to the line it ends)."""
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    idx = np.arange(len(text))
    after_nl = np.where(np.r_[False, chars[:-1] == 10], idx, 0)
    return np.maximum.accumulate(after_nl)


def column(text: str) -> np.ndarray:
    """Characters read on the current line: 0 after a newline, 1 after the line's first character."""
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    idx = np.arange(len(text))
    last_nl = np.maximum.accumulate(np.where(chars == 10, idx, -1))
    return idx - last_nl


def to_line_end(text: str) -> np.ndarray:
    """Characters still to read before the newline that ends the line (1 just before it)."""
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    idx = np.arange(len(text))
    nl = np.where(chars == 10, idx, len(text))
    next_nl = np.minimum.accumulate(nl[::-1])[::-1]         # first newline at or after t
    nxt = np.r_[next_nl[1:], len(text)]                      # first newline after t
    return nxt - idx


def indent(text: str) -> np.ndarray:
    """Indentation width of the current line (tabs to multiples of 8, as ``str.expandtabs``)."""
    chars = _chars(text)
    n = len(chars)
    starts = np.flatnonzero(np.r_[True, chars[:-1] == 10]) if n else np.zeros(0, np.int64)
    blank = (chars == 32) | (chars == 9)
    nxt = np.minimum.accumulate(np.where(blank, n, np.arange(n))[::-1])[::-1]   # first non-blank at or after t
    lead = nxt[starts] - starts
    width = np.zeros(len(starts), np.int64)
    long = np.flatnonzero(lead > LONG_LEAD)             # a line of thousands of blanks: one string each
    width[long] = [len(text[s:s + m].expandtabs(TAB)) for s, m in zip(starts[long], lead[long])]
    live = np.flatnonzero((lead > 0) & (lead <= LONG_LEAD))
    for k in range(int(lead[live].max(initial=0))):     # the k-th blank of every line that has one
        live = live[lead[live] > k]
        tab = chars[starts[live] + k] == 9
        width[live] = np.where(tab, (width[live] // TAB + 1) * TAB, width[live] + 1)
    return np.repeat(width, np.diff(np.r_[starts, n]))


def _chars(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


BUILTIN: dict[str, Callable] = {
    "in_double_quotes": in_double_quotes, "in_single_quotes": in_single_quotes,
    "in_string": in_string, "in_comment": in_comment, "column": column, "to_line_end": to_line_end,
    "indent": indent, "paren_depth": paren_depth, "bracket_depth": bracket_depth, "brace_depth": brace_depth,
    "in_if_condition": in_if_condition,
}
CODE = {"in_string", "in_comment", "paren_depth", "bracket_depth", "brace_depth", "in_if_condition"}
# the defaults by what is known of the text: a zoo model's corpus names its language; a user's model
# gets the tracks that assume no language (an English apostrophe rule or a C lexer would be guesses)
LANGUAGE_FREE = ["in_double_quotes", "column", "to_line_end", "indent"]
PROSE = ["in_double_quotes", "in_single_quotes", "column", "to_line_end", "indent"]
CODE_DEFAULTS = ["in_string", "in_comment", "column", "to_line_end", "indent", "paren_depth", "bracket_depth",
                 "brace_depth", "in_if_condition", "in_double_quotes"]


def defaults_for(language: str | None) -> list[str]:
    """The built-ins scored by default on text of a lexer ``language`` (None: prose)."""
    return list(PROSE if language is None else CODE_DEFAULTS)


class FeatureSkipped(UserWarning):
    """A feature that could not be scored (constant on the scored steps): the table's attrs say which."""


def compute(text: str, features=None, language: str = "c") -> pd.DataFrame:
    """``[time x features]`` DataFrame. ``features``: built-in names, or a dict name -> ``text -> array``
    (or -> a built-in's name); default every built-in. ``language`` is the lexer for the code tracks."""
    if not text:
        raise RnnscopeError("the text is empty", "features need at least one character")
    if features is None:
        features = list(BUILTIN)
    if not isinstance(features, Mapping):
        unknown = [f for f in features if f not in BUILTIN]
        if unknown:
            raise RnnscopeError(f"unknown feature(s) {', '.join(map(repr, unknown))}",
                                f"use built-ins ({', '.join(BUILTIN)}) or pass a dict of name -> function")
        features = {f: f for f in features}
    features = {k: builtin(f, language) if isinstance(f, str) else f for k, f in features.items()}
    cols = {}
    for name, fn in features.items():
        values = np.asarray(fn(text) if getattr(fn, "__module__", "").startswith("rnnscope.") else
                            call_user(fn, text, doing=f"feature {name!r} failed"))
        if values.shape != (len(text),):
            raise RnnscopeError(f"feature {name!r} gave shape {list(values.shape)} for a text of {len(text)} characters",
                                "a feature must return one number per character")
        if not _numbers(values):
            raise RnnscopeError(f"feature {name!r} gave {values.dtype} values", "return numbers or booleans")
        if np.nanmin(values) == np.nanmax(values):
            warnings.warn(f"feature {name!r} is constant on this text; its scores will be NaN", stacklevel=2)
        cols[name] = values
    return pd.DataFrame(cols)


def _numbers(values: np.ndarray) -> bool:
    return values.dtype == bool or np.issubdtype(values.dtype, np.number)


def builtin(name: str, language: str = "c") -> Callable:
    """The built-in feature ``name`` as ``text -> array[chars]``, its code tracks read with ``language``'s lexer."""
    if name not in BUILTIN:
        raise RnnscopeError(f"unknown feature {name!r}", f"use a built-in ({', '.join(BUILTIN)}) or a function")
    return (lambda s: BUILTIN[name](s, language)) if name in CODE else BUILTIN[name]


def own_features(own: Mapping) -> dict:
    """The user's features checked: names that can be a table's column and shown on a page, each a
    function (or ``on_tokens``), never a built-in's name (a table would hold two meanings for it)."""
    if not isinstance(own, Mapping):
        raise RnnscopeError(f"own features are a {type(own).__name__}", "pass a dict of name -> text -> array")
    for name, fn in own.items():
        if not isinstance(name, str) or not FEATURE_NAME.fullmatch(name):
            shown = escaped(name, limit=40) if isinstance(name, str) else type(name).__name__
            raise RnnscopeError(f"feature name {shown} is not a name",
                                "use letters, digits and underscores, at most 64, starting with a letter")
        if name in BUILTIN or name == "step":
            raise RnnscopeError(f"feature {name!r} is a built-in's name", "give your feature a name of its own")
        if isinstance(fn, str) or not (callable(fn) or isinstance(fn, on_tokens) or hasattr(fn, "__len__")):
            raise RnnscopeError(f"feature {name!r} is a {type(fn).__name__}, not a function",
                                "map each name to a function text -> array (one number per character), "
                                "on_tokens(fn), or an array of one number per step")
    return dict(own)


FEATURE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}", re.ASCII)


class on_tokens:
    """Marks ``fn(tokens: list[str]) -> array[steps]`` as a feature of the step list, not of the text:
    ``find_neurons(run, {"capitalised": on_tokens(lambda ts: [t[:1].isupper() for t in ts])})``."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise RnnscopeError(f"on_tokens got a {type(fn).__name__}", "pass a function tokens -> array[steps]")
        self.fn = fn


def steps(src, features, language: str = "c") -> pd.DataFrame:
    """``[steps x features]`` float64 for a ``source.Source``: per-character tracks computed on each
    document and taken at the last character of each step's span, ``on_tokens`` features called on
    the step list; NaN at steps without text."""
    if isinstance(features, Mapping):
        by_char = {k: f for k, f in features.items() if callable(f) or isinstance(f, str)}
        by_token = {k: f for k, f in features.items() if isinstance(f, on_tokens)}
        by_step = {k: f for k, f in features.items() if k not in by_char and k not in by_token}
    else:
        by_char, by_token, by_step = list(features), {}, {}
    cols = {}
    if by_char:
        docs = src.documents[["char_start", "char_end"]].to_numpy(np.int64)
        per_doc = [compute(src.text[a:b], by_char, language) for a, b in docs]
        chars = pd.concat(per_doc, ignore_index=True) if len(per_doc) > 1 else per_doc[0]
        cols.update({k: src.per_step(chars[k].to_numpy()) for k in chars.columns})
    tokens = src.tokens() if by_token else []
    for name, feat in by_token.items():
        values = np.asarray(call_user(feat.fn, tokens, doing=f"token feature {name!r} failed"))
        if not _numbers(values):
            raise RnnscopeError(f"token feature {name!r} gave {values.dtype} values", "return numbers or booleans")
        values = values.astype(np.float64)
        if values.shape != (src.steps,):
            raise RnnscopeError(f"token feature {name!r} gave shape {list(values.shape)} for {src.steps} steps",
                                "a token feature must return one number per step")
        cols[name] = np.where(src.has_text, values, np.nan)
    for name, values in by_step.items():        # given per step already: an audio frame's label, a probe's target
        values = np.asarray(values)
        if values.shape != (src.steps,) or not _numbers(values):
            raise RnnscopeError(f"feature {name!r} is a {values.dtype} array of shape {list(values.shape)} for "
                                f"{src.steps} steps", "give one number per step, a function text -> array, "
                                "or on_tokens(fn)")
        cols[name] = np.where(src.scored, values.astype(np.float64), np.nan)
    names = list(features) if isinstance(features, Mapping) else list(by_char)
    return pd.DataFrame({k: cols[k] for k in names})
