"""The README's Python examples, run as written, from a folder that holds a user's own
``analysis.py``, ``probe.py`` and ``zoo.py``: rnnscope must import none of them, and they must stay
importable beside rnnscope."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
SHADOWS = ("analysis", "probe", "zoo", "dashboards")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


def test_readme_examples_run_beside_user_modules_of_the_same_names(tmp_path):
    for name in SHADOWS:        # a user's module that would break rnnscope if rnnscope imported it
        (tmp_path / f"{name}.py").write_text(f"MINE = {name!r}\n")
    script = "\n".join(python_blocks())
    script += "\nimport analysis, probe, zoo, dashboards\n"
    script += "assert (analysis.MINE, probe.MINE, zoo.MINE, dashboards.MINE) == SHADOWS\n"
    script += "assert sorted(m for m in sys.modules if m.split('.')[0] in SHADOWS) == sorted(SHADOWS)\n"
    script += "print('README OK', len(run), table.shape)\n"
    (tmp_path / "readme_examples.py").write_text(f"import sys\nSHADOWS = {SHADOWS!r}\n" + script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "readme_examples.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README OK" in proc.stdout
    assert (tmp_path / "runs" / "x" / "manifest.json").exists()


def test_no_top_level_package_of_a_generic_name_is_installed(tmp_path):
    code = ("import importlib.util, rnnscope.probe, rnnscope.analysis, rnnscope.dashboards, rnnscope.zoo\n"
            f"print([n for n in {SHADOWS!r} if importlib.util.find_spec(n) is not None])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
