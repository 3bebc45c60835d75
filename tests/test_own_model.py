"""The user's own model, recorded right or refused: modules that run another number of steps than the
text, gradients that survive storage, a document's fields reaching the user's call and loss, the chunk
a bidirectional model needs, and word-level traces in memory. Models are built and trained here."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rnnscope import probe
from rnnscope.errors import RnnscopeError
from rnnscope.store import open_run

V = 32


def char_ids(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) % (V - 1) + 1 for c in text])         # 0 is the decoder's SOS


class Seq2Seq(nn.Module):
    """A GRU encoder and a GRU decoder. ``mode``: "teacher" feeds SOS + the ids (n + 1 steps for n),
    "free" runs ``free_steps`` steps of its own, "capped" at most ``cap`` steps (a max-length decoder)."""

    def __init__(self, mode: str, free_steps: int = 12, cap: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.free_steps, self.cap = mode, free_steps, cap
        self.emb = nn.Embedding(V, 6)
        self.encoder, self.decoder = nn.GRU(6, 8, batch_first=True), nn.GRU(6, 8, batch_first=True)
        self.out = nn.Linear(8, V)

    def forward(self, ids):
        _, h = self.encoder(self.emb(ids))
        if self.mode == "teacher":
            dec_in = torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)
        elif self.mode == "free":
            dec_in = torch.zeros(ids.shape[0], self.free_steps, dtype=torch.long)
        else:
            dec_in = ids[:, : self.cap]
        y, _ = self.decoder(self.emb(dec_in), h)
        return self.out(y)


# 1. never a wrong Run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, got, want", [("teacher", "3 steps", "2 steps"), ("free", "12 steps", "2 steps"),
                                             ("capped", "8 steps", "9 steps")])
def test_a_module_on_other_steps_than_the_text_is_refused_naming_it_and_both_counts(tmp_path, mode, got, want):
    model = Seq2Seq(mode)
    sub = probe.Subject(model, char_ids, loss=None)
    with pytest.raises(RnnscopeError) as err:
        probe.record(sub, {"a": "abcdefghi", "b": "xyz"}, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "'decoder'" in msg and f"ran {got}" in msg and f"gave {want}" in msg and "--modules encoder" in msg
    assert "\n" not in msg and not (tmp_path / "run").exists()
    # the modules on the text's steps are still recorded, and equal the module's own outputs
    run = probe.record(sub, {"a": "abcdefghi", "b": "xyz"}, tmp_path / "run", modules=["encoder"],
                       dtype="float32", progress=False)
    assert run.keys() == ["encoder.l0.h", "encoder.l0.r", "encoder.l0.z", "encoder.l0.n"] or \
        set(run.keys()) == {"encoder.l0.h", "encoder.l0.r", "encoder.l0.z", "encoder.l0.n"}
    with torch.no_grad():
        want_h = model.encoder(model.emb(char_ids("abcdefghi")[None]))[0][0].numpy()
    np.testing.assert_allclose(run["encoder.l0.h"][:9], want_h, rtol=1e-5, atol=1e-6)


def test_a_user_loss_of_the_wrong_length_is_refused(tmp_path):
    """The loss's length is checked against the steps it was given (a decoder's n + 1 losses for n)."""
    model = Seq2Seq("teacher")

    def loss(output, ids):
        return F.cross_entropy(output[0].float(), torch.cat([ids, ids[:1]]), reduction="none")

    with pytest.raises(RnnscopeError, match=r"loss returned shape \[10\] for 9 steps"):
        probe.record(probe.Subject(model, char_ids, loss=loss, modules=["encoder"]), "abcdefghi", tmp_path / "r",
                     grad=True, progress=False)
