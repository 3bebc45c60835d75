"""The Run: a directory holding one probe's recording, read back memory-mapped.

    RUN/manifest.json        format version, model identity and checksum, vocabulary, keys, dtype, flags
    RUN/text.txt             the text, one timestep per character
    RUN/loss.npy             [time] next-character loss in nats (NaN where there is no next character)
    RUN/states/{key}.npy     [time, units] NumPy arrays, opened with mmap_mode='r', never loaded whole
    RUN/units.parquet        one row per unit: key, index, layer, kind, mean, std, min, max

A Run appears under its final name only once complete (it is written beside it and renamed),
and its manifest says ``complete: true``: an interrupted probe never leaves one that looks done.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rnnscope.errors import RnnscopeError

FORMAT, FORMAT_VERSION = "rnnscope-run", 1


def key_file(key: str) -> str:
    return f"states/{key}.npy"


class Run:
    """``run.text``, ``run.keys()``, ``run[key] -> [time, units]`` (memory-mapped), ``run.loss``, ``run.units``."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {len(self)} chars, {len(self.keys())} keys, {self.manifest['dtype']})"

    def __len__(self) -> int:
        return self.manifest["text"]["chars"]

    @cached_property
    def text(self) -> str:
        return (self.path / "text.txt").read_text(encoding="utf-8")

    def keys(self) -> list[str]:
        return list(self.manifest["keys"])

    def __contains__(self, key: str) -> bool:
        return key in self.manifest["keys"]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.manifest["keys"]:
            hint = "record with --grad" if key.split(".")[-1].startswith("grad_") else "check run.keys()"
            raise RnnscopeError(f"{self.path} has no key {key!r} (it has {', '.join(self.keys()[:6])}, ...)", hint)
        return np.load(self.path / key_file(key), mmap_mode="r")

    @property
    def loss(self) -> np.ndarray:
        return np.load(self.path / "loss.npy", mmap_mode="r")

    @cached_property
    def units(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "units.parquet")

    @property
    def nonfinite(self) -> dict[str, int]:
        """Keys whose recording held NaN or Inf (or overflowed the on-disk dtype): key -> count."""
        return {k: v["nonfinite"] + v["overflow"] for k, v in self.manifest["keys"].items()
                if v["nonfinite"] or v["overflow"]}


def open_run(path) -> Run:
    """Open a Run written by ``probe.record`` / ``rnnscope probe``."""
    path = Path(path)
    if not path.is_dir():
        raise RnnscopeError(f"no run at {path}", "create one with `rnnscope probe CHECKPOINT --text FILE --out RUN`")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RnnscopeError(f"{path} is not an rnnscope run (no readable manifest.json)",
                            "point at a directory written by `rnnscope probe`")
    if not manifest.get("complete"):
        raise RnnscopeError(f"{path} is an incomplete run (the probe was interrupted)", "run `rnnscope probe` again")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RnnscopeError(f"{path} has run format {manifest['format_version']}, newer than this rnnscope reads",
                            "upgrade rnnscope")
    missing = [k for k in manifest["keys"] if not (path / key_file(k)).exists()]
    if missing:
        raise RnnscopeError(f"{path} is damaged: {len(missing)} state file(s) missing, e.g. {key_file(missing[0])}",
                            "run `rnnscope probe` again")
    return Run(path, manifest)
