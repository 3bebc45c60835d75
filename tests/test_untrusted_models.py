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
