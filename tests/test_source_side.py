"""The encoder's side of an encoder-decoder Run (``record(source_modules=)``, ``probe --source-modules``):
a Run of its own over the source texts, ``RUN/encoder/``, whose encoder states equal the encoder's own
outputs and whose gradients equal float64 autograd through an unrolled reference of the whole model;
the planted source-vowel unit found by ``analyze RUN/encoder``; every misuse one line, nothing written."""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnscope as rs
from rnnscope.cli import main
from rnnscope.probe.corpus import read_documents

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
import translate_sides as example  # noqa: E402

MODEL = f"{ROOT / 'examples' / 'translate_sides.py'}:build"
pytestmark = pytest.mark.filterwarnings("ignore::rnnscope.analysis.neurons.CoarseNull")


def next_id_loss(output, ids):
    """Every step predicts the next id (the last one the first): a loss at every step, so every state has
    a gradient."""
    return F.cross_entropy(output[0], ids.roll(-1), reduction="none")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sides")
    pairs = example.pairs()
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    sub = example.build()
    run = rs.record(rs.Subject(sub.model, example.encode, loss=next_id_loss, call=example.translate),
                    read_documents(root / "pairs.jsonl"), root / "run", modules=["cell"], source_modules=["encoder"],
                    grad=True, dtype="float32", progress=False)
    return root, pairs, sub.model, run


def test_the_encoder_side_is_a_run_over_the_sources_equal_to_the_encoders_outputs(recorded):
    root, pairs, model, run = recorded
    side = rs.open_run(root / "run" / "encoder")
    assert run.manifest["source_side"] == {"folder": "encoder", "modules": ["encoder"], "steps": len(side),
                                           "keys": ["encoder.l0.grad_h", "encoder.l0.h"]}
    assert side.text == "".join(p["source"] for p in pairs) and run.text == "".join(p["target"] for p in pairs)
    assert list(side.documents["name"]) == list(run.documents["name"]) == [p["name"] for p in pairs]
    assert side.manifest["model"]["checksum"] == run.manifest["model"]["checksum"]
    assert set(run.keys()) == {f"cell.l0.{k}" for k in ("h", "c", "i", "f", "g", "o", "grad_h", "grad_c")}
    for d, p in enumerate(pairs):
        a, b = side.documents.loc[d, ["step_start", "step_end"]]
        assert side.tokens(a, b) == list(p["source"])
        with torch.no_grad():
            own = model.encoder(model.embed(example.encode(p["source"])))[0][0].numpy()
        np.testing.assert_allclose(side["encoder.l0.h"][a:b], own, rtol=0, atol=1e-6)


class Unrolled(nn.Module):
    """The encoder's ``nn.RNN`` as a float64 loop of its own equations, each h kept for its gradient."""

    def __init__(self, rnn: nn.RNN):
        super().__init__()
        self.rnn, self.hs = rnn, []

    def forward(self, x):
        r, h, self.hs = self.rnn, x.new_zeros(len(x), self.rnn.hidden_size), []
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + h @ r.weight_hh_l0.T + r.bias_hh_l0)
            h.retain_grad()
            self.hs.append(h)
        return torch.stack(self.hs, 1), h[None]


def test_the_encoders_gradients_equal_float64_autograd_through_the_whole_model(recorded):
    root, pairs, model, run = recorded
    side = rs.open_run(root / "run" / "encoder")
    ref = copy.deepcopy(model).double()
    ref.encoder = Unrolled(ref.encoder)
    worst = 0.0
    for d, p in enumerate(pairs):
        ids = example.encode(p["target"])
        next_id_loss(ref(ids, example.encode(p["source"])), ids[0]).sum().backward()
        want = torch.cat([h.grad for h in ref.encoder.hs]).numpy()
        a, b = side.documents.loc[d, ["step_start", "step_end"]]
        got = side["encoder.l0.grad_h"][a:b]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        assert np.abs(want).max() > 1e-4                      # the decoder's loss reaches the encoder
    assert worst < 1e-5, worst                                  # float32 storage: ~1e-7


def test_the_readme_commands_find_the_planted_source_unit(tmp_path, capsys, monkeypatch):
    """The README's block run as written (its runs/ under tmp_path), from the repository root."""
    from test_frames_cli import readme_commands, run_commands
    commands = readme_commands("translate_sides.py")
    assert [c.split()[:2] for c in commands] == [["python", "examples/translate_sides.py"], ["rnnscope", "probe"],
                                                 ["rnnscope", "analyze"]]
    (tmp_path / "runs").mkdir()
    run_commands(commands, tmp_path, monkeypatch)
    out = tmp_path / "runs" / "pairs"
    assert "the encoder's side (encoder, " in capsys.readouterr().out
    table = rs.store.read_table(rs.open_run(out / "encoder"), "neurons")
    best = table[table["feature"] == "vowel"].sort_values("strength", ascending=False).iloc[0]
    assert best["unit"] == "encoder.l0.h:0" and best["heldout_score"] > 0.99


def refused(capsys, *args) -> str:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as err:
        rc = err.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rnnscope: error: ") and "\n" not in err and " — " in err, err
    return err


def test_misuse_is_one_line_and_writes_nothing(tmp_path, capsys, recorded):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in example.pairs(3)), encoding="utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text("abcabc", encoding="utf-8")
    out = tmp_path / "run"
    base = ["probe", "--model", MODEL, "--out", out]
    assert "these documents have none" in refused(capsys, *base, "--text", plain, "--source-modules", "encoder")
    assert "no recurrent module named 'decoder'" in refused(capsys, *base, "--text", pairs, "--source-modules", "decoder")
    assert "named in both" in refused(capsys, *base, "--text", pairs, "--source-modules", "encoder",
                                      "--modules", "encoder")
    for grad in ([], ["--grad"]):       # the next document's encoder reads its own source afresh
        assert "cannot be carried into the next document" in refused(
            capsys, *base, "--text", pairs, "--source-modules", "encoder", "--modules", "cell", "--carry", *grad)
    for line, said in (({"source": "abc"}, 'has a "source" but no "target"'),
                       ({"target": "abc"}, 'has a "target" but no "source"'),
                       ({"source": 3, "target": "abc"}, 'has a "source" that is a int')):
        half = tmp_path / "half.jsonl"
        half.write_text(json.dumps({"source": "ab", "target": "ba"}) + "\n" + json.dumps(line) + "\n")
        assert f"half.jsonl line 2 {said}" in refused(capsys, *base, "--text", half, "--modules", "cell")
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))
    sub = example.build()
    short = lambda model, ids, document: model(ids, example.encode(document["source"][:-1]))     # noqa: E731
    with pytest.raises(rs.RnnscopeError, match="ran 3 steps in document 'pair0', whose source the encoder makes 4"):
        rs.record(rs.Subject(sub.model, example.encode, call=short),
                  [{"name": "pair0", "source": "abcd", "target": "dcba"}], out, modules=["cell"],
                  source_modules=["encoder"], progress=False)
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))
    root = recorded[0]
    stray = root / "run" / "encoder" / "states" / "notes.txt"      # --overwrite would delete a file not its own
    stray.write_text("mine")
    try:
        assert "rnnscope did not write" in refused(capsys, "probe", "--model", MODEL, "--text", pairs,
                                                   "--source-modules", "encoder", "--out", root / "run", "--overwrite")
    finally:
        stray.unlink()


def test_the_encoders_gradients_that_float16_cannot_hold_are_said_and_flagged(tmp_path, capsys):
    """An encoder-side gradient past float16's range is warned about by its key and flags the top manifest,
    as the decoder's own keys are."""
    sub = example.build()
    big = lambda output, ids: 1e9 * next_id_loss(output, ids)      # noqa: E731
    run = rs.record(rs.Subject(sub.model, example.encode, loss=big, call=example.translate),
                    example.pairs(3), tmp_path / "run", modules=["cell"], source_modules=["encoder"], grad=True,
                    grad_dtype="float16", progress=False)
    said = capsys.readouterr().out
    assert "warning: encoder/encoder.l0.grad_h has" in said and "overflow float16" in said
    assert run.manifest["nonfinite"] is True
    assert run.manifest["source_side"] and rs.open_run(tmp_path / "run" / "encoder").manifest["nonfinite"] is True
