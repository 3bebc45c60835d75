"""Bad numbers, paths, hosts and units on the command line: one line `rnnscope: error: problem — fix`,
exit 2, before anything is loaded or written. Run in-process: argparse refuses them before any import."""
import socket

import pytest

from rnnscope.cli import main

RUN = "no-such-run"     # argument checks come before the Run is opened


def refused(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnscope: error:") and " — " in err[0], err
    assert pattern in err[0], err[0]


@pytest.mark.parametrize("argv, pattern", [
    (["serve", RUN, "--port", "70000"], "from 1 to 65535"),
    (["serve", RUN, "--port", "-1"], "from 1 to 65535"),
    (["serve", RUN, "--port", "0x10"], "not a whole number"),
    (["serve", RUN, "--host", "no-such-host.invalid"], "does not resolve"),
    (["serve", RUN, "--window", "0"], "at least 1"),
    (["analyze", RUN, "--top", "0"], "at least 1"),
    (["analyze", RUN, "--top", "-3"], "at least 1"),
    (["analyze", RUN, "--shifts", "0"], "at least 1"),
    (["analyze", RUN, "--shifts", "-2"], "at least 1"),
    (["analyze", RUN, "--max-lag", "-5"], "at least 1"),
    (["analyze", RUN, "--heldout", "1.5"], "between 0 and 1"),
    (["analyze", RUN, "--heldout", "nan"], "not a finite number"),
    (["analyze", RUN, "--controls", "0"], "at least 1"),
    (["analyze", RUN, "--features", "in_comment,../x"], "not a name"),
    (["probe", "zoo:lstm-linux", "--text", "README.md", "--out", "x", "--max-chars", "-5"], "at least 0"),
    (["probe", "zoo:lstm-linux", "--text", "README.md", "--out", "x", "--chunk", "0"], "at least 1"),
    (["probe", "zoo:lstm-linux", "--text", "README.md", "--out", "x", "--horizon", "-1"], "at least 0"),
    (["probe", "zoo:lstm-linux", "--text", "no-such-file.txt", "--out", "x"], "does not exist"),
    (["probe", "zoo:lstm-linux", "--text", "/dev/null", "--out", "x"], "not a regular file"),
    (["probe", "zoo:lstm-linux", "--text", "README.md", "--out", "x", "--kinds", "h,c;rm"], "not a name"),
    (["export", RUN, "--unit", "rnn.l0.c:\u00b2", "--out", "x.png"], "not a unit"),
    (["export", RUN, "--unit", "../../etc.l0.c:1", "--out", "x.png"], "not a unit"),
    (["export", RUN, "--units", "rnn.l0.c:1,rnn.l0.c:-1", "--out", "x.png"], "not a unit"),
    (["export", RUN, "--feature", "in_comment", "--top", "-3", "--out", "x.png"], "at least 1"),
    (["export", RUN, "--unit", "rnn.l0.c:1", "--start", "-1", "--out", "x.png"], "at least 0"),
    (["zoo", "train", "--out", "x", "--dropout", "5"], "from 0 up to"),
    (["zoo", "train", "--out", "x", "--layers", "0"], "at least 1"),
    (["zoo", "train", "--out", "x", "--lr", "-1"], "above 0"),
    (["probe"], "required"),
    (["nonsense"], "invalid choice"),
])
def test_bad_argument_is_one_line_exit_2(capsys, argv, pattern):
    refused(capsys, argv, pattern)


def test_a_text_directory_is_a_corpus_and_one_without_text_files_is_one_line(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / ".hidden.txt").write_text("skipped")
    assert main(["probe", "zoo:lstm-linux", "--text", str(tmp_path / "corpus"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no text files" in err[0] and not (tmp_path / "x").exists()
    (tmp_path / "corpus" / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    assert main(["probe", "zoo:lstm-linux", "--text", str(tmp_path / "corpus"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bin.txt is not UTF-8" in err[0] and not (tmp_path / "x").exists()


def test_ipv6_loopback_is_a_host():
    from rnnscope import argtypes
    try:
        socket.getaddrinfo("::1", None)
    except socket.gaierror:
        pytest.skip("no IPv6 on this machine")
    assert argtypes.host("::1") == "::1" and argtypes.host("[::1]") == "::1"


def test_export_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    out = tmp_path / "figure.png"
    out.write_bytes(b"precious")
    assert main(["export", "no-such-run", "--unit", "rnn.l0.c:1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"


def test_an_internal_error_is_one_line_not_a_traceback(monkeypatch, capsys):
    import argparse

    from rnnscope import cli

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    class Parser:
        def parse_args(self, argv=None):
            return argparse.Namespace(func=broken)
    monkeypatch.setattr(cli, "parser", Parser)
    monkeypatch.delenv("RNNSCOPE_DEBUG", raising=False)
    code = cli.main([])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "internal error ZeroDivisionError: division by zero" in err[0], err


def test_probe_stores_crlf_and_cr_text_byte_for_byte(tmp_path, tiny_checkpoint, capsys):
    """The command line reads --text with line endings untouched, so the Run's text and its
    checksum are the file's (universal newlines used to turn CRLF into LF on the way in)."""
    import hashlib

    from rnnscope.probe import open_run
    raw = b"int a;\r\nif (b) {\r\n\tc;\r}\n"
    (tmp_path / "t.c").write_bytes(raw)
    assert main(["probe", str(tiny_checkpoint), "--text", str(tmp_path / "t.c"), "--out", str(tmp_path / "run"),
                 "--unk", " "]) == 0
    run = open_run(tmp_path / "run")
    assert run.text.encode() == raw and len(run) == len(raw.decode())
    assert (tmp_path / "run" / "text.txt").read_bytes() == raw
    assert run.manifest["text"]["sha256"] == hashlib.sha256(raw).hexdigest()
