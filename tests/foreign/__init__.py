"""Foreign shapes: recurrent models rnnscope did not train, each built from code alone in one spec file.

Each ``NAME.py`` here has a spec function for ``rnnscope probe --model tests/foreign/NAME.py:fn``
returning a ``Subject`` (or ``(model, encode[, loss])``). They train for seconds on the shipped
samples where training matters, and cache the result per process. ``foreign_kit.py`` holds what they share.
"""
