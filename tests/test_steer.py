"""Steering: greedy generation with a clamp equals the argmax of the clamped model re-run over the
whole text (an independent full-sequence forward); unclamped and clamped rows share their random
numbers; bad clamps, primes and models are one-line errors."""
import numpy as np
import pytest
import torch

from conftest import char_model
from rnnscope.analysis import Intervention
from rnnscope.analysis.steer import feature_share, generate, parse_clamp
from rnnscope.errors import RnnscopeError


@pytest.mark.parametrize("arch, unit", [("lstm", "rnn.l0.c:3"), ("gru", "rnn.l1.h:5"), ("lstm", "rnn.l1.f:0")])
def test_greedy_clamped_generation_equals_full_sequence_argmax(arch, unit, tiny_vocab):
    ck = char_model(arch, tiny_vocab, seed=1)
    prime = "if (a) { b; }\n"
    value = 3.0 if unit.split(":")[0].endswith(".c") else 0.9
    frame = generate(ck.model, ck.vocab, prime, 12, clamps={unit: value}, seeds=[0], temperature=0)
    seen = []
    for clamped, text in zip(frame["clamped"], frame["text"]):
        ids = ck.vocab.encode(prime + text)
        key, index = unit.split(":")
        width = ck.model.rnn.hidden_size
        mask = torch.zeros(width, dtype=torch.bool)
        mask[int(index)] = clamped
        with torch.no_grad(), Intervention(ck.model, {key: (mask, value)}):
            logits = ck.model(ids)
        want = logits[0, len(prime) - 1:-1].argmax(-1)
        assert ck.vocab.decode(want) == text, (clamped, text)
        seen.append(logits[0, len(prime) - 1])
    assert not torch.allclose(seen[0], seen[1])      # the clamp reaches the output


def test_rows_of_one_seed_share_random_numbers_and_seeds_differ(tiny_vocab):
    ck = char_model("lstm", tiny_vocab, seed=2)
    frame = generate(ck.model, ck.vocab, "a", 40, seeds=[0, 1], temperature=1.0)
    assert frame.loc[0, "text"] == frame.loc[1, "text"] and frame.loc[2, "text"] == frame.loc[3, "text"]
    assert frame.loc[0, "text"] != frame.loc[2, "text"]
    again = generate(ck.model, ck.vocab, "a", 40, seeds=[1], temperature=1.0)
    assert again.loc[0, "text"] == frame.loc[2, "text"]


def test_feature_share_counts_generated_characters_only():
    import pandas as pd
    frame = pd.DataFrame({"text": ["xxyy", "yyyy"]})
    shares = feature_share(frame, "yy", lambda t: np.array([c == "x" for c in t]))["share"]
    assert shares.tolist() == [0.5, 0.0]


@pytest.mark.parametrize("clamps, match", [
    ({"rnn.l5.c:0": 1.0}, "has no state"),
    ({"rnn.l0.c:99": 1.0}, "has 16 units"),
    ({"enc.l0.q:1": 1.0}, "has no state"),
])
def test_bad_clamps_are_one_line_errors(clamps, match, tiny_vocab):
    ck = char_model("lstm", tiny_vocab)
    with pytest.raises(RnnscopeError, match=match):
        generate(ck.model, ck.vocab, "a", 3, clamps=clamps)


@pytest.mark.parametrize("spec", ["rnn.l0.c:1", "rnn.l0.c:1=abc", "=3", "rnn.l0.c:1=nan", "rnn.l0.c:1=inf"])
def test_parse_clamp_refuses_what_is_not_a_clamp(spec):
    with pytest.raises(RnnscopeError, match="is not a clamp"):
        parse_clamp(spec)


def test_prime_outside_the_vocabulary_and_a_model_that_is_not_a_language_model(tiny_vocab):
    ck = char_model("gru", tiny_vocab)
    with pytest.raises(RnnscopeError, match="outside the model's vocabulary"):
        generate(ck.model, ck.vocab, "ABC", 3)

    class Tagger(torch.nn.Module):          # one 2-way label per step: not next-character logits
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(tiny_vocab), 4)
            self.rnn = torch.nn.GRU(4, 6, batch_first=True)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, ids):
            return self.head(self.rnn(self.embed(ids))[0])
    with pytest.raises(RnnscopeError, match=r"not next-character logits"):
        generate(Tagger(), tiny_vocab, "ab", 3)
    with pytest.raises(RnnscopeError, match="length must be at least 1"):
        generate(ck.model, ck.vocab, "ab", 0)


def test_generate_command_prints_both_samples_and_the_measured_share(tiny_checkpoint, capsys):
    from rnnscope.cli import main
    assert main(["generate", str(tiny_checkpoint), "--prime", "\"a", "--length", "30", "--seeds", "3",
                 "--clamp", "rnn.l0.c:2=4", "--measure", "in_double_quotes"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- seed") == 6 and out.count("clamped rnn.l0.c:2=4; in_double_quotes") == 3
    assert "share of generated characters in in_double_quotes over 3 seeds" in out
    assert main(["generate", str(tiny_checkpoint), "--prime", "a", "--clamp", "rnn.l0.c:99=1"]) == 2
    assert "has 16 units" in capsys.readouterr().err
