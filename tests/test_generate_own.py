"""`rnnscope generate --model SPEC`: a user's own char language model (a fused nn.LSTM, and the same
weights in an nn.LSTMCell loop) samples text, with units clamped through the Intervention; `--out`
writes a Run whose states equal an independent forward pass over prime + generated text (a cell loop's
bit for bit);
what cannot be sampled is refused in one line."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from rnnscope.analysis.steer import generate_own, record_generated
from rnnscope.cli import main
from rnnscope.errors import RnnscopeError
from rnnscope.store import open_run

TEXT = "hello world! " * 30
PRIME, LENGTH = "hel", 20
WANT = TEXT[len(PRIME):len(PRIME) + LENGTH]        # what follows "hel" in the repeating text
SPEC = '''
import torch
from torch import nn

CHARS = sorted(set("hello world! "))


def encode(text):
    return torch.tensor([CHARS.index(c) for c in text])


encode.decode = lambda ids: "".join(CHARS[int(i)] for i in ids)


def plain_encode(text):
    return torch.tensor([CHARS.index(c) for c in text])


class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(len(CHARS), 8), nn.LSTM(8, 16, batch_first=True), \\
            nn.Linear(16, len(CHARS))

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


class Loop(nn.Module):
    """The same network as a step loop over an nn.LSTMCell (a decoder's shape)."""
    def __init__(self):
        super().__init__()
        self.embed, self.cell, self.head = nn.Embedding(len(CHARS), 8), nn.LSTMCell(8, 16), nn.Linear(16, len(CHARS))

    def forward(self, ids):
        h = c = torch.zeros(ids.shape[0], 16)
        outs = []
        for x in self.embed(ids).unbind(1):
            h, c = self.cell(x, (h, c))
            outs.append(self.head(h))
        return torch.stack(outs, 1)


def _weights():
    return torch.load(__file__.replace("lm.py", "lm.pt"), weights_only=True)


def fused():
    m = Fused()
    m.load_state_dict(_weights())
    return m.eval(), encode


def loop():
    w = {k.replace("lstm.", "cell.").replace("_l0", ""): v for k, v in _weights().items()}
    m = Loop()
    m.load_state_dict(w)
    return m.eval(), encode


def no_decode():
    return fused()[0], plain_encode


class Hidden(Fused):
    def forward(self, ids):
        return self.lstm(self.embed(ids))[0]


class Tagger(Fused):
    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])[..., 0]


def hidden():
    return Hidden().eval(), encode


def tagger():
    return Tagger().eval(), encode
'''


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The spec file and its module, the fused model trained for about a second on the repeating text."""
    import importlib.util
    folder = tmp_path_factory.mktemp("lm")
    (folder / "lm.py").write_text(SPEC)
    spec = importlib.util.spec_from_file_location("lm_for_generate", folder / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.Fused()
    ids = module.encode(TEXT)[None]
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).backward()
        opt.step()
    torch.save(model.state_dict(), folder / "lm.pt")
    return folder, module


def spec(lm, fn):
    return f"{lm[0] / 'lm.py'}:{fn}"


def refused(capsys, pattern, *argv):
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnscope: error: "), err
    assert pattern in err[0], err[0]


@pytest.mark.parametrize("fn", ["fused", "loop"])
def test_cli_prints_the_greedy_continuation_and_a_seed_repeats(lm, fn, capsys):
    assert main(["generate", "--model", spec(lm, fn), "--prime", PRIME, "--length", str(LENGTH), "--seed", "0",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- seed 0, unclamped" in out and PRIME + WANT in out, out
    runs = []
    for _ in range(2):
        assert main(["generate", "--model", spec(lm, fn), "--prime", PRIME, "--length", "30", "--seed", "0"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]


def _cell_reference(module, text, clamp=None):
    """An independent forward of the Loop model over ``text``: its cell's h and c ``[T, 16]`` and
    logits ``[T, V]``, with ``clamp=(index, value)`` setting h[index] after each step."""
    model, encode = module.loop()
    h = c = torch.zeros(1, 16)
    hs, cs, logits = [], [], []
    with torch.no_grad():
        for x in model.embed(encode(text)[None]).unbind(1):
            h, c = model.cell(x, (h, c))
            if clamp:
                h = h.clone()
                h[:, clamp[0]] = clamp[1]
            hs.append(h[0]), cs.append(c[0]), logits.append(model.head(h)[0])
    return torch.stack(hs).numpy(), torch.stack(cs).numpy(), torch.stack(logits)


def test_out_run_of_a_fused_lstm_equals_its_own_forward_and_says_it_was_generated(lm, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", spec(lm, "fused"), "--prime", PRIME, "--length", str(LENGTH),
                 "--temperature", "0", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    run = open_run(out)
    assert run.text == PRIME + WANT and len(run) == len(PRIME) + LENGTH
    assert run.manifest["generated"] == {"prime": PRIME, "clamps": {}, "seeds": [0], "temperature": 0.0,
                                         "length": LENGTH}
    model, encode = lm[1].fused()
    ids = encode(run.text)[None]
    with torch.no_grad():
        h, (_, c_last) = model.lstm(model.embed(ids))
        logits = model.head(h)
    # the Probe runs the fused kernel in its training mode, one ulp from the plain inference kernel
    # (3e-7 measured): the contract is 1e-5 relative; a step loop's cells are bit for bit (below)
    assert np.abs(run["lstm.l0.h"] - h[0].numpy()).max() < 1e-6
    assert np.abs(run["lstm.l0.c"][-1] - c_last[0, 0].numpy()).max() < 1e-6
    # greedy: the recorded model's argmax at each step is the next generated character
    assert torch.equal(logits[0, len(PRIME) - 1:-1].argmax(-1), ids[0, len(PRIME):])
    refused(capsys, "already exists", "generate", "--model", spec(lm, "fused"), "--prime", PRIME, "--out", out)


def test_a_clamp_changes_the_text_and_the_run_holds_the_unit_at_its_value(lm, tmp_path):
    module = lm[1]
    subject = module.loop()
    frame = generate_own(subject, PRIME, LENGTH, clamps={"cell.l0.h:3": 4.0}, temperature=0)
    plain, clamped = frame["text"]
    assert plain == WANT and clamped != plain
    run = record_generated(subject, frame, PRIME, tmp_path / "clamped", clamps={"cell.l0.h:3": 4.0}, temperature=0)
    assert run.text == PRIME + clamped and run.manifest["generated"]["clamps"] == {"cell.l0.h:3": 4.0}
    assert (run["cell.l0.h"][:, 3] == 4.0).all()                # at every step, generated ones included
    h, c, logits = _cell_reference(module, run.text, clamp=(3, 4.0))
    assert np.array_equal(run["cell.l0.h"], h) and np.array_equal(run["cell.l0.c"], c)
    assert module.encode.decode(logits[len(PRIME) - 1:-1].argmax(-1)) == clamped
    # the same clamp on the fused LSTM, through the CLI
    out = tmp_path / "fused"
    assert main(["generate", "--model", spec(lm, "fused"), "--prime", PRIME, "--length", str(LENGTH),
                 "--temperature", "0", "--clamp", "lstm.l0.h:3=4", "--out", str(out)]) == 0
    fused = open_run(out)
    assert (fused["lstm.l0.h"][:, 3] == 4.0).all() and fused.text != PRIME + WANT
    assert np.allclose(fused["lstm.l0.h"], h, atol=1e-5)        # the same network, clamped the same way


def test_what_cannot_be_sampled_is_refused_in_one_line(lm, tmp_path, capsys):
    out = tmp_path / "never"
    for pattern, fn, *more in [
            ("has no decode", "no_decode"),
            ("not next-token logits [1, 3, V]", "tagger"),
            ("has 16 values per step but its embedding holds 9 ids", "hidden"),
            ("the model has no state 'rnn.l0.c'", "fused", "--clamp", "rnn.l0.c:0=1"),
            ("lstm.l0.h has 16 units", "fused", "--clamp", "lstm.l0.h:16=1")]:
        refused(capsys, pattern, "generate", "--model", spec(lm, fn), "--prime", PRIME, "--out", out, *more)
    assert not out.exists()
    refused(capsys, "two models given", "generate", "zoo:gru-linux", "--model", spec(lm, "fused"), "--prime", "a")


def test_a_tampered_generated_field_is_refused_on_open(lm, tmp_path):
    subject = lm[1].fused()
    frame = generate_own(subject, PRIME, 5, temperature=0)
    run = record_generated(subject, frame, PRIME, tmp_path / "r", temperature=0)
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["generated"]["clamps"] = {"../x": 1}
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RnnscopeError, match="malformed generated"):
        open_run(run.path)



def test_a_zoo_model_writes_its_clamped_samples_one_document_per_seed(tiny_vocab, tmp_path):
    from conftest import char_model
    from rnnscope.analysis.steer import sample
    ck = char_model("lstm", tiny_vocab, seed=1)
    frame = sample(ck, "if (a) ", 15, clamps={"rnn.l0.c:3": 3.0}, seeds=[0, 1], temperature=1.0)
    run = record_generated(ck, frame, "if (a) ", tmp_path / "zoo", clamps={"rnn.l0.c:3": 3.0})
    clamped = frame[frame.clamped]
    assert run.text == "".join("if (a) " + t for t in clamped["text"])
    assert list(run.documents["name"]) == ["seed 0", "seed 1"] and run.manifest["generated"]["seeds"] == [0, 1]
    assert (run["rnn.l0.c"][:, 3] == 3.0).all() and not (run["rnn.l1.c"][:, 3] == 3.0).all()
