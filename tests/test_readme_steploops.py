"""The README's "Step loops, cells and attention" code, run as written (training shortened through
$ATTENTION_LOOP_STEPS, the Run written under tmp_path), from the repository root as after a clone.
Its blocks are fenced ```py: they import examples/, which tests/test_readme.py (every ```python block,
run from an empty folder) could not."""
import re
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]


def blocks() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Step loops, cells and attention", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, re.S)


def test_the_readme_attention_example_trains_probes_and_records(tmp_path, monkeypatch, capsys):
    example, loop, _ = blocks()
    assert loop in ROOT.joinpath("examples/attention_loop.py").read_text()      # the loop shown is the one run
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ATTENTION_LOOP_STEPS", "250")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    ns = {}
    exec(compile(example.replace('"runs/reverse"', repr(str(tmp_path / "reverse"))), "README", "exec"), ns)
    losses, w, p, run = ns["losses"], ns["weights"], ns["p"], ns["run"]
    assert len(losses) == 250 and np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])      # it learned
    assert w.shape == (1, 9, 9) and torch.allclose(w.sum(-1), torch.ones(1, 9), atol=1e-5)
    assert (w[0].argmax(1) == torch.arange(8, -1, -1)).float().mean() >= 0.5             # it looks where it writes
    assert p.trace["cell.l0.f"].shape == (1, 9, 32) and p.trace["cell.l0.grad_c"].abs().sum() > 0
    keys = set(run.keys())
    assert {f"cell.l0.{k}" for k in ("h", "c", "i", "f", "g", "o", "grad_h", "grad_c")} <= keys
    assert {"encoder.l0.h", "encoder.l0_reverse.h"} <= keys and len(run) == len("recurrentattentionloops")
    # the Run's cell states are the in-memory probe's on the same document
    from attention_loop import encode
    with __import__("rnnscope").Probe(ns["model"]) as q:
        ns["model"](encode("attention"))
    a, b = (int(v) for v in run.documents.iloc[1][["step_start", "step_end"]])       # "attention"
    assert (a, b) == (9, 18)
    np.testing.assert_allclose(np.asarray(run["cell.l0.h"])[a:b], q.trace["cell.l0.h"][0].numpy(), atol=2e-3)
    assert run.attention_names() == ["attention"] and np.array_equal(ns["stored"], w[0].numpy())   # exactly


def test_the_readme_hand_written_cell_records_its_gates(capsys):
    *_, ln = blocks()
    ns = {}
    exec(compile(ln, "README", "exec"), ns)
    p, state = ns["p"], ns["state"]
    assert list(p.trace) == ["l0.h", "l0.c", "l0.i", "l0.f", "l0.g", "l0.o", "l0.grad_h", "l0.grad_c"]
    assert p.trace["l0.h"].shape == (2, 7, 5) and torch.equal(p.trace["l0.h"][:, -1], state[0].detach())
    assert torch.equal(p.trace["l0.grad_h"][:, -1], torch.ones(2, 5))          # d(sum h_T)/dh_T
