"""Features of your own, for ``rnnscope analyze RUN --features examples/features.py:features``.

Each is a function ``text -> one number per character``: its value at character t is what the state can
know after reading t (as the built-ins). On a Run of words a step takes the value at the last
character of its word. ``features()`` returns them by name; a file may also name one function alone
(``--features examples/features.py:capitalised``)."""
import numpy as np


def features() -> dict:
    return {"capitalised": capitalised, "after_comma": after_comma}


def capitalised(text: str) -> np.ndarray:
    """1 on every character of a word that starts with a capital letter."""
    out = np.zeros(len(text))
    start = 0
    for t, ch in enumerate(text):
        if not ch.isalpha():
            start = t + 1
        elif text[start].isupper():
            out[t] = 1.0
    return out


def after_comma(text: str) -> np.ndarray:
    """1 from a comma to the end of its line: inside a clause that a comma opened."""
    out = np.zeros(len(text))
    inside = False
    for t, ch in enumerate(text):
        inside = (inside or ch == ",") and ch != "\n"
        out[t] = inside
    return out
