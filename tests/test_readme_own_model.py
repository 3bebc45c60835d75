"""The README's "Your own model" commands, run as written (training shortened to a few seconds, `serve`
started and asked for its page instead of left running), from the repository root as after a clone."""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]


def own_model_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Your own model", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_own_model_example_runs_as_written(tmp_path):
    commands = own_model_commands()
    assert commands[0].startswith("python examples/word_lstm.py") and any(c.startswith("rnnscope serve") for c in commands)
    env = {**os.environ, "WORD_LSTM_DIR": str(tmp_path / "word_lstm")}
    for line in commands:
        args = shlex.split(line.replace("runs/", f"{tmp_path}/runs/"))
        if args[0] == "python":
            args = [sys.executable, *args[1:], "3"]                   # 3 s of training instead of 60
        else:
            args = [sys.executable, "-m", "rnnscope.cli", *args[1:]]
        if args[1:4] == ["-m", "rnnscope.cli", "serve"]:
            port = free_port()
            server = subprocess.Popen([*args, "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            try:
                for _ in range(240):
                    try:
                        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                        break
                    except OSError:
                        assert server.poll() is None, server.stderr.read().decode()[-2000:]
                        time.sleep(0.5)
                assert "bokeh" in page.lower()
            finally:
                server.terminate()
                server.wait(30)
            continue
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    runs = tmp_path / "runs" / "words"
    assert (runs / "manifest.json").exists() and (runs / "analysis" / "neurons.parquet").exists()
    assert (runs / "to_line_end.html").stat().st_size > 10_000
    import pandas as pd                                   # the user's features reached the Run and the page
    neurons = pd.read_parquet(runs / "analysis" / "neurons.parquet")
    assert {"capitalised", "after_comma", "to_line_end", "in_single_quotes"} <= set(neurons["feature"])
    assert set(pd.read_parquet(runs / "analysis" / "features.parquet").columns) == {"step", "capitalised", "after_comma"}
    assert "feature capitalised" in (runs / "capitalised.html").read_text()
