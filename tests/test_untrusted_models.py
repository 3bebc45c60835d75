"""Issue 24, models and what is asked of them: a prime, a clamp or a model the computation cannot
use is refused in one line naming what is wrong, before it costs minutes or ends in a numerical
library's own error; a model it can use (bfloat16) gives the same answer as in float32."""
import copy

import pytest
import torch

from conftest import char_model
from rnnscope.analysis.lyapunov import spectrum
from rnnscope.analysis.steer import generate
from rnnscope.cli import main
from rnnscope.errors import RnnscopeError
from rnnscope.zoo import Vocab
from test_untrusted_paths import one_line

VOCAB = Vocab("ab\ncd ()")
TEXT = "ab(cd)\n" * 10


@pytest.fixture(scope="module")
def ck():
    return char_model("lstm", VOCAB, hidden=6)


def test_a_prime_of_128_kb_is_refused_before_it_is_run(ck, tiny_checkpoint, capsys, tmp_path):
    prime = "ab(cd)\n" * (128_000 // 7)
    with pytest.raises(RnnscopeError) as e:
        generate(ck.model, VOCAB, prime, 5, clamps={"rnn.l0.c:1": 2.0})
    one_line(e, "127,995 characters", "at most 10,000")
    assert len(generate(ck.model, VOCAB, prime[:10_000], 3, clamps={"rnn.l0.c:1": 2.0})) == 2   # at the bound
    assert main(["generate", str(tiny_checkpoint), "--prime", "a" * 128_000, "--length", "3"]) == 2
    assert "--prime" in capsys.readouterr().err


@pytest.mark.parametrize("value", [1e308, -1e7, float("nan"), float("inf"), True, "2"])
def test_a_clamp_beyond_any_state_or_not_finite_is_refused(ck, value):
    with pytest.raises(RnnscopeError) as e:
        generate(ck.model, VOCAB, "ab", 3, clamps={"rnn.l0.h:1": value})
    one_line(e, "rnn.l0.h:1", "±1e+06")


@pytest.mark.parametrize("value", ["1e308", "-1e7", "nan", "inf"])
def test_the_clamp_flag_refuses_the_same_values(tiny_checkpoint, capsys, value):
    try:
        code = main(["generate", str(tiny_checkpoint), "--prime", "a", "--clamp", f"rnn.l0.c:1={value}"])
    except SystemExit as exc:           # argparse's own refusal (the same one line)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnscope: error:") and "Traceback" not in err[0], err


def _nan_in(model, part: str):
    model = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if part in n).view(-1)[0] = float("nan")
    return model


@pytest.mark.parametrize("part,words", [("weight_hh", "weight_hh_l0 holds 1 non-finite value"),
                                        ("emb", "embed.weight holds 1 non-finite value")])
def test_spectrum_of_a_model_with_nan_weights_is_one_line(ck, part, words):
    with pytest.raises(RnnscopeError) as e:
        spectrum(_nan_in(ck.model, part), VOCAB.encode(TEXT), k=2, max_lag=5, positions=8, samples=5)
    one_line(e, words)


def test_spectrum_of_a_meta_device_model_is_one_line(ck):
    with pytest.raises(RnnscopeError) as e:
        spectrum(copy.deepcopy(ck.model).to("meta"), VOCAB.encode(TEXT), k=2, max_lag=5, positions=8)
    one_line(e, "meta device")


def test_spectrum_of_a_bfloat16_model_matches_float32(ck):
    ids = VOCAB.encode(TEXT)
    want = spectrum(ck.model, ids, k=2, measure=False, samples=5)
    got = spectrum(copy.deepcopy(ck.model).to(torch.bfloat16), ids, k=2, measure=False, samples=5)
    # bfloat16 keeps 8 bits of mantissa: the states differ by ~1e-2, the rates by less
    assert abs(got.lambda_1 - want.lambda_1).max() < 0.05


USER_MODELS = '''
import torch
from torch import nn
import rnnscope as rs


def enc(text):
    return [ord(c) % 16 for c in text]


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(16, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 16)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


class Replaces(Base):
    def forward(self, ids):
        self.rnn = nn.LSTM(4, 5, batch_first=True)          # a new module at every call
        return self.head(self.rnn(self.emb(ids))[0])


class Never(Base):
    def forward(self, ids):
        return self.head(torch.zeros(*ids.shape, 5))


class Exits(Base):
    def forward(self, ids):
        raise SystemExit(7)


def exit7(*args):
    raise SystemExit(7)


def replaces(): return Replaces(), enc
def never(): return Never(), enc
def none_call(): return rs.Subject(Base(), enc, call=lambda model, ids: (model(ids), None)[1])
def none_call_with_document(): return rs.Subject(Base(), enc, call=lambda model, ids, document: (model(ids), document["name"], None)[2])
def fine(): return Base(), enc
def exits_encoder(): return Base(), exit7
def exits_forward(): return Exits(), enc
def exits_loss(): return rs.Subject(Base(), enc, loss=exit7)
def exits_call(): return rs.Subject(Base(), enc, call=exit7)
def exits_spec(): raise SystemExit(7)
'''


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "models.py").write_text(USER_MODELS)
    (d / "text.txt").write_text("hello world\nabc\n")
    return d


def _probe(user_models, tmp_path, fn, capsys, *flags):
    out = tmp_path / "out"
    try:
        code = main(["probe", "--model", f"{user_models / 'models.py'}:{fn}", "--text", str(user_models / "text.txt"),
                     "--out", str(out), *flags])
    except SystemExit as exc:               # the user's SystemExit(7) must not get this far
        code = ("SystemExit", exc.code)
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if ln.startswith("rnnscope") or "Traceback" in ln]
    return code, err, out


@pytest.mark.parametrize("fn,flags,words", [
    ("replaces", (), "replaced its recurrent module rnn"),
    ("never", (), "never ran its recurrent module rnn"),
    ("none_call", (), "call returned None"),
    ("none_call_with_document", (), "call returned None"),
    ("exits_encoder", (), "SystemExit"),
    ("exits_forward", (), "SystemExit"),
    ("exits_loss", ("--grad",), "SystemExit"),
    ("exits_call", (), "SystemExit"),
    ("exits_spec", (), "SystemExit")])
def test_a_user_model_that_cannot_be_recorded_is_one_line(user_models, tmp_path, capsys, fn, flags, words):
    code, err, out = _probe(user_models, tmp_path, fn, capsys, *flags)
    assert code == 2 and len(err) == 1 and err[0].startswith("rnnscope: error:") and words in err[0], (code, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_same_user_model_written_right_records(user_models, tmp_path, capsys):
    code, err, out = _probe(user_models, tmp_path, "fine", capsys, "--grad")
    assert code == 0 and not err and (out / "states" / "rnn.l0.h.npy").exists()
