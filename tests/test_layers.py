"""The stack is one-way: every module imports only its own layer or those below it, at module level
or inside a function; and reading, serving and exporting a Run import neither torch nor numba."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rnnscope": "rnnscope", "probe": "rnnscope.probe", "analysis": "rnnscope.analysis",
           "dashboards": "rnnscope.dashboards", "zoo": "rnnscope.zoo"}
# bottom to top; a module's layer is that of the longest prefix listed
LAYERS = [
    ["rnnscope.errors", "rnnscope.lazy"],
    ["rnnscope.store"],
    ["rnnscope.zoo"],                           # models, vocabulary, corpora, checkpoints: no probe
    ["rnnscope.probe"],
    ["rnnscope.analysis", "rnnscope.zoo.train"],   # the trainer watches a run, so it sits above the probe
    ["rnnscope.dashboards"],
    ["rnnscope", "rnnscope.cli", "rnnscope.argtypes"],
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer")


def modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            yield ".".join((package, *rel)), path


NAMES = {name for name, _ in modules()}


def imports(module: str, path: Path):
    """Every rnnscope module ``module`` imports, anywhere in the file (``from rnnscope import zoo`` is
    ``rnnscope.zoo``; ``from . import features`` in a package is its submodule)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "rnnscope")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "rnnscope":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in NAMES]
            yield from subs or [target]


def test_no_module_imports_up_the_stack():
    upward = []
    for module, path in modules():
        for target in imports(module, path):
            if layer(target) > layer(module):
                upward.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a store module importing the probe, inside a function, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rnnscope.probe import Probe\n    from . import format\n")
    found = list(imports("rnnscope.store.bad", bad))
    assert "rnnscope.probe" in found and "rnnscope.store.format" in found
    assert layer("rnnscope.probe") > layer("rnnscope.store.bad")


def test_reading_serving_and_exporting_a_run_import_no_torch():
    code = ("import sys\n"
            "import rnnscope as rs\n"
            "from rnnscope.store import open_run, parse_key\n"
            "import rnnscope.dashboards.server, rnnscope.dashboards.app, rnnscope.dashboards.export\n"
            "import rnnscope.dashboards.watch_app, rnnscope.dashboards.watch_export, rnnscope.argtypes\n"
            "rs.open_run, rs.Run\n"
            "heavy = [m for m in ('torch', 'numba') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_lazy_names_resolve_to_what_they_name():
    """A package that shares its name with one of its modules (``rnnscope.probe`` and ``probe/probe.py``)
    is still the package; a name that is a class or function of a module is that object."""
    import rnnscope as rs
    from rnnscope import analysis, probe
    from rnnscope.probe import probe as probe_module
    assert probe.__name__ == "rnnscope.probe" and callable(probe.record) and rs.probe is probe
    assert probe_module.__name__ == "rnnscope.probe.probe" and probe.Probe is probe_module.Probe is rs.Probe
    assert analysis.features.__name__ == "rnnscope.analysis.features" and rs.features is analysis.features
    assert rs.Intervention is probe.Intervention is analysis.Intervention and callable(rs.dashboards.serve)


def test_a_probed_model_still_pickles():
    """The engine holds its module weakly (no reference cycle), yet a model probed at the moment it is
    pickled (as Dask's cloudpickle may send it) pickles, and its copy runs."""
    import pickle

    import cloudpickle
    import torch

    import rnnscope as rs
    m = torch.nn.LSTM(3, 4)
    with rs.Probe(m):
        copy = pickle.loads(cloudpickle.dumps(m))
    out, _ = copy(torch.randn(5, 1, 3))
    assert out.shape == (5, 1, 4)
