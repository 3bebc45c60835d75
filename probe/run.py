"""The Run reader lives in the store (``rnnscope.store``); kept here so old imports still work."""
from rnnscope.store import FORMAT, FORMAT_VERSION, Run, key_file, open_run

__all__ = ["FORMAT", "FORMAT_VERSION", "Run", "key_file", "open_run"]
