"""rnnscope.load(SPEC) on models rnnscope did not build: spec files, packages, TorchScript archives,
weights with a builder; and one line for every way a SPEC can be wrong."""
import sys
import textwrap

import pytest
import torch
from torch import nn

from reference import unrolled
from rnnscope.errors import RnnscopeError
from rnnscope.probe import Probe
from rnnscope.probe import specs as models
from rnnscope.probe.specs import choose
from rnnscope.probe.subject import Subject
from rnnscope.probe.torchscript import Replayed

SPEC_FILE = '''
import torch
from torch import nn


class Tagger(nn.Module):
    """A char model with a GRU inside a custom module and a per-step 2-way head."""

    def __init__(self, rnn="gru"):
        super().__init__()
        self.embed = nn.Embedding(128, 5)
        self.enc = nn.Module()
        self.enc.rnn = (nn.GRU if rnn == "gru" else nn.LSTM)(5, 7, num_layers=2, batch_first=True)
        self.head = nn.Linear(7, 2)

    def forward(self, ids):
        x, _ = self.enc.rnn(self.embed(ids))
        return torch.log_softmax(self.head(torch.relu(x)), -1)


def encode(text):
    return torch.tensor([[min(ord(c), 127) for c in text]])


def encode_factory():
    return encode


def build():
    torch.manual_seed(0)
    return Tagger(), encode


def build_lstm():
    torch.manual_seed(1)
    return Tagger("lstm")


def as_subject():
    return SUBJECT_CLASS(build()[0], encode, loss=None, name="tagger")


def no_rnn():
    return nn.Linear(2, 2), encode


def explodes():
    x = 1
    return x / 0


def tensor():
    return torch.zeros(2)


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(SPEC_FILE.replace("SUBJECT_CLASS", "__import__('rnnscope').Subject"))
    return path


def fails(spec, pattern, **kw):
    with pytest.raises(RnnscopeError) as err:
        models.load(str(spec), **kw)
    line = str(err.value)
    assert "\n" not in line and " — " in line, line
    assert pattern in line, line
    return line


def test_a_file_spec_gives_a_subject_without_touching_sys_path(spec):
    before = list(sys.path)
    s = models.load(f"{spec}:build")
    assert isinstance(s, Subject) and s.source == f"{spec}:build"
    assert type(s.model).__name__ == "Tagger" and s.loss == "auto"
    assert s.encoder("ab").tolist() == [[97, 98]]
    assert sys.path == before and not any(str(spec.parent) == p for p in sys.path)
    subject = models.load(f"{spec}:as_subject")
    assert subject.loss is None and subject.name == "tagger"


def test_a_package_module_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Embedding(5, 3), nn.LSTM(3, 4)), lambda t: None, None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = models.load("mypkg.nets:build")
    assert isinstance(s.model[1], nn.LSTM) and s.loss is None
    fails("mypkg.nope:build", "no module named 'mypkg.nope'")
    fails("mypkg.nets:missing", "mypkg.nets has no attribute 'missing'")


def test_zoo_and_checkpoint_directories_still_give_checkpoints(tiny_checkpoint):
    from rnnscope.zoo import Checkpoint
    assert isinstance(models.load(tiny_checkpoint), Checkpoint)
    assert models.load("zoo:gru-linux").name == "gru-linux"


def test_every_bad_spec_is_one_line_naming_what_is_wrong(spec, tmp_path):
    fails(tmp_path / "none.py:build", f"{tmp_path / 'none.py'} does not exist")
    (tmp_path / "notes.txt").write_text("x")
    fails(f"{tmp_path / 'notes.txt'}:build", "is not a .py file")
    (tmp_path / "broken.py").write_text("import torch\n\nraise ImportError('no such thing')\n")
    fails(f"{tmp_path / 'broken.py'}:build", "broken.py line 3: no such thing")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    fails(f"{tmp_path / 'syntax.py'}:f", "syntax.py line 1: syntax error")
    fails(f"{spec}:nope", "has no attribute 'nope'")
    fails(f"{spec}:NOT_A_FUNCTION", "is a int, not a function")
    fails(f"{spec}:no_rnn", "no nn.RNN / nn.LSTM / nn.GRU module")
    fails(f"{spec}:explodes", "ZeroDivisionError at")
    fails(f"{spec}:tensor", "returned Tensor")
    fails(f"{spec}:encode", "encode() missing 1 required positional argument")
    fails("nosuch_package_xyz:build", "no module named 'nosuch_package_xyz'")


def test_modules_are_checked_by_name(spec):
    s = models.load(f"{spec}:build")
    assert choose(s.model, ["enc.rnn"]) == ["enc.rnn"]
    with pytest.raises(RnnscopeError, match=r"no recurrent module 'rnn' — choose from 'enc.rnn'"):
        choose(s.model, ["rnn"])


def _archive(spec, tmp_path, trace=False):
    model, encode = models.call(models.resolve(f"{spec}:build", "--model"), "build")
    model.eval()
    ids = encode("int x = 1;")
    scripted = torch.jit.trace(model, ids) if trace else torch.jit.script(model)
    path = tmp_path / "tagger.pt"
    torch.jit.save(scripted, str(path))
    return model, encode, path


@pytest.mark.parametrize("trace", [False, True])
def test_a_torchscript_archive_is_replayed_exactly_and_recorded_against_the_reference(spec, tmp_path, trace):
    eager, encode, path = _archive(spec, tmp_path, trace)
    s = models.load(path, encoder=encode)
    assert isinstance(s.model, Replayed) and s.encoder is encode
    archive = torch.jit.load(str(path))
    ids = encode("while (x) { y = x--; }")
    assert torch.equal(s.model(ids), archive(ids))             # the archive's own output, bit for bit
    with Probe(s.model, grad=True) as p:
        out = s.model(ids)
        out[0, :, 1].sum().backward()
    assert torch.equal(out, archive(ids))
    rnn = eager.enc.rnn
    ref_out, ref, deltas = unrolled(rnn, eager.embed(ids).detach(), perturb=True)
    head = eager.head
    ref_logits = torch.relu(ref_out) @ head.weight.double().T + head.bias.double()
    torch.log_softmax(ref_logits, -1)[0, :, 1].sum().backward()
    assert sorted(p.trace) == sorted(f"enc.rnn.l{i}.{k}" for i in (0, 1) for k in ("h", "r", "z", "n", "grad_h"))
    for layer in (0, 1):
        for kind in "hrzn":
            want = ref[(layer, False, kind)]
            assert (p.trace[f"enc.rnn.l{layer}.{kind}"].double() - want).abs().max() < 1e-5
        want = deltas[(layer, False, "h")].grad
        got = p.trace[f"enc.rnn.l{layer}.grad_h"].double()
        assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_a_spec_function_may_return_a_scripted_model(spec, tmp_path):
    _, _, path = _archive(spec, tmp_path)
    (tmp_path / "wrap.py").write_text(f"import torch\nfrom mine import encode\n"
                                      f"def load():\n    return torch.jit.load({str(path)!r}), encode\n")
    s = models.load(f"{tmp_path / 'wrap.py'}:load")
    assert isinstance(s.model, Replayed) and list(dict(s.model.named_modules())) == ["", "enc", "enc.rnn"]


def test_bad_archives(spec, tmp_path):
    fails(tmp_path / "absent.pt", "does not exist")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    fails(tmp_path / "weights.pt", "is not a TorchScript archive")
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.ReLU())), str(tmp_path / "mlp.pt"))
    fails(tmp_path / "mlp.pt", "holds no nn.RNN / nn.LSTM / nn.GRU module")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "mlp.pt").read_bytes()[:-200])
    fails(tmp_path / "cut.pt", "cut.pt")


def test_an_archive_that_is_one_scripted_rnn_is_that_rnn_rebuilt(tmp_path):
    torch.manual_seed(3)
    gru = nn.GRU(3, 4, 2, batch_first=True).eval()
    torch.jit.save(torch.jit.script(gru), str(tmp_path / "gru.pt"))
    m = models.archive(tmp_path / "gru.pt")
    x = torch.randn(1, 6, 3)
    assert isinstance(m, nn.GRU) and m.batch_first and torch.equal(m(x)[0], gru(x)[0])


class _Trap:
    """Unpickling this runs code: it would create the file ``hit``."""

    def __init__(self, where):
        self.where = where

    def __reduce__(self):
        return (open, (self.where, "w"))


def test_weights_with_a_builder_never_unpickle_and_check_keys_and_shapes(spec, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(5)
    trained = models.load(f"{spec}:build_lstm").model
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    for weights in ("w.pt", "w.safetensors"):
        s = models.load(f"{tmp_path / weights}@{spec}:build_lstm")
        for k, v in trained.state_dict().items():
            assert torch.equal(s.model.state_dict()[k], v)
    assert s.encoder is None and s.source.endswith("@" + f"{spec}:build_lstm")

    state = trained.state_dict()
    torch.save({k: v for k, v in state.items() if k != "head.bias"}, tmp_path / "less.pt")
    fails(f"{tmp_path / 'less.pt'}@{spec}:build_lstm", "lacks 'head.bias'")
    torch.save({**state, "extra.w": torch.zeros(1)}, tmp_path / "more.pt")
    fails(f"{tmp_path / 'more.pt'}@{spec}:build_lstm", "holds 'extra.w'")
    torch.save({**state, "head.bias": torch.zeros(3)}, tmp_path / "shape.pt")
    fails(f"{tmp_path / 'shape.pt'}@{spec}:build_lstm", "'head.bias' has shape [3] but")
    torch.save({"x": _Trap(str(tmp_path / "hit"))}, tmp_path / "trap.pt")
    fails(f"{tmp_path / 'trap.pt'}@{spec}:build_lstm", "is not a weights-only state_dict")
    assert not (tmp_path / "hit").exists()
    fails(f"{tmp_path / 'nope.pt'}@{spec}:build_lstm", "weights file")


@pytest.mark.parametrize("make", [lambda: nn.LSTM(3, 6, 2, proj_size=4, bidirectional=True),
                                  lambda: nn.RNN(3, 5, 2, nonlinearity="relu", batch_first=True),
                                  lambda: nn.GRU(3, 4, bias=False)], ids=["lstm-proj-bi", "rnn-relu", "gru-nobias"])
@pytest.mark.parametrize("trace", [False, True], ids=["script", "trace"])
def test_every_family_and_layout_is_rebuilt_exactly(make, trace, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = torch.randn(2, 5, 3)
    torch.jit.save(torch.jit.trace(model, x) if trace else torch.jit.script(model), str(tmp_path / "m.pt"))
    archive = torch.jit.load(str(tmp_path / "m.pt"))
    replayed = models.archive(tmp_path / "m.pt")
    with Probe(replayed) as p:
        out = replayed(x)
    flat = lambda o: [t for v in o for t in (flat(v) if isinstance(v, tuple) else [v])]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(out), flat(archive(x)), strict=True))
    _, ref, _ = unrolled(model[0], x)
    for (layer, rev, kind), want in ref.items():
        got = p.trace[f"0.l{layer}{'_reverse' if rev else ''}.{kind}"].double()
        assert (got - want).abs().max() < 1e-5


def test_zoo_options_still_reach_the_zoo_loader(tiny_checkpoint, tiny_vocab, tmp_path):
    import rnnscope as rs
    from rnnscope.zoo import load as zoo_load
    ck = zoo_load(tiny_checkpoint)
    torch.save(ck.model.state_dict(), tmp_path / "m.pt")
    bare = rs.load(tmp_path / "m.pt", arch="lstm", vocab=tiny_vocab.chars, embed=8, hidden=16, layers=2)
    assert all(torch.equal(a, b) for a, b in zip(bare.model.state_dict().values(), ck.model.state_dict().values()))
    assert rs.load(tiny_checkpoint, verify=False).vocab.chars == tiny_vocab.chars
