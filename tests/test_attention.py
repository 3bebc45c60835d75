"""Attention at every step (probe/attention.py): the weights a named module computes over the source,
recorded one step per call, against the weights the model itself returns; and the refusals."""
import pytest
import torch
from torch import nn

import rnnscope as rs
from rnnscope.probe import Probe
from steploops import AttnDecoderRNN, Captioner

F = nn.functional


class SoftAttention(nn.Module):
    """Show, Attend and Tell's ``Attention``: ``(feats [B, P, E], h [B, H]) -> (awe [B, E], alpha [B, P])``."""

    def __init__(self, E, H, A):
        super().__init__()
        self.enc_att, self.dec_att, self.full_att = nn.Linear(E, A), nn.Linear(H, A), nn.Linear(A, 1)

    def forward(self, feats, h):
        att = self.full_att(torch.relu(self.enc_att(feats) + self.dec_att(h).unsqueeze(1))).squeeze(2)
        alpha = att.softmax(1)
        return (feats * alpha.unsqueeze(2)).sum(1), alpha


class AttendingCaptioner(Captioner):
    """``steploops.Captioner`` with its attention in a module, returning its alphas ``[B, L-1, P]``
    (zeros past each caption's end) as the original code does."""

    def __init__(self, V=11, E=6, A=5, H=8):
        super().__init__(V, E, A, H)
        self.attention = SoftAttention(E, H, A)

    def forward(self, feats, caps, lengths):
        mean = feats.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        emb, dec = self.embed(caps), [n - 1 for n in lengths]
        preds = feats.new_zeros(len(lengths), max(dec), self.fc.out_features)
        alphas = feats.new_zeros(len(lengths), max(dec), feats.shape[1])
        for t in range(max(dec)):
            bt = sum(n > t for n in dec)
            awe, alpha = self.attention(feats[:bt], h[:bt])
            h, c = self.cell(torch.cat([emb[:bt, t], torch.sigmoid(self.f_beta(h[:bt])) * awe], 1), (h[:bt], c[:bt]))
            preds[:bt, t], alphas[:bt, t] = self.fc(self.drop(h)), alpha
        return preds, alphas


class BahdanauAttention(nn.Module):
    """The translation tutorial's: ``(query [B, 1, H], keys [B, S, H]) -> (context [B, 1, H], weights [B, 1, S])``."""

    def __init__(self, H):
        super().__init__()
        self.Wa, self.Ua, self.Va = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, 1)

    def forward(self, query, keys):
        weights = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys))).squeeze(2).unsqueeze(1).softmax(-1)
        return torch.bmm(weights, keys), weights


class TutorialDecoder(AttnDecoderRNN):
    """``steploops.AttnDecoderRNN`` with the tutorial's ``BahdanauAttention`` module; returns its
    attentions ``[B, T, S]`` concatenated as the tutorial's ``forward`` does."""

    def __init__(self, V=10, H=6):
        super().__init__(V, H)
        self.attention = BahdanauAttention(H)

    def forward(self, src, tgt):
        enc, hidden = self.encoder(self.embed(src))
        outs, attentions = [], []
        for t in range(tgt.shape[1]):
            ctx, w = self.attention(hidden.permute(1, 0, 2), enc)
            o, hidden = self.gru(torch.cat([self.embed(tgt[:, t:t + 1]), ctx], 2), hidden)
            outs.append(self.out(o))
            attentions.append(w)
        return torch.cat(outs, 1), torch.cat(attentions, 1)


def captions(B=4, P=9, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 6, 4, 2][:B]
    return torch.randn(B, P, E, generator=g), torch.randint(0, 11, (B, max(lengths)), generator=g), lengths


def test_a_captioner_records_its_attention_at_every_step_nan_past_each_caption():
    torch.manual_seed(0)
    model, (feats, caps, lengths) = AttendingCaptioner().eval(), captions()
    with Probe(model, grad=True, attention=["attention"]) as p:
        preds, alphas = model(feats, caps, lengths)
        (preds * torch.randn(preds.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    att = p.attention["attention"]
    assert att.shape == (4, 6, 9)
    for b, n in enumerate(lengths):
        assert torch.equal(att[b, :n - 1], alphas[b, :n - 1].detach())
        assert torch.isnan(att[b, n - 1:]).all()
    valid = ~torch.isnan(att[..., 0])
    assert torch.equal(valid, ~torch.isnan(p.trace["cell.l0.h"][..., 0]))     # one step of attention per cell step
    assert ((att[valid].sum(-1) - 1).abs() < 1e-6).all()
    assert "attention: attention, 1 sequence(s)" in repr(p)
    assert not model.attention._forward_hooks                                  # the hook left with the block

    with Probe(model, grad=True) as q:                                          # recording attention changes nothing
        preds2, _ = model(feats, caps, lengths)
        (preds2 * torch.randn(preds.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert torch.equal(preds, preds2)
    for k in ("cell.l0.h", "cell.l0.grad_h", "cell.l0.grad_c"):
        assert torch.equal(p.trace[k].nan_to_num(), q.trace[k].nan_to_num())


def test_the_tutorial_decoder_records_its_bahdanau_weights_through_a_picker():
    torch.manual_seed(2)
    model = TutorialDecoder()
    src, tgt = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3, 4))
    with Probe(model, attention={"attention": lambda out: out[1].squeeze(1)}) as p:
        _, attentions = model(src, tgt)
    assert torch.equal(p.attention["attention"], attentions.detach())
    assert p.attention["attention"].shape == (3, 4, 5) and p.trace["gru.l0.h"].shape == (3, 4, 6)
    # the same module's output without a picker: weights [B, 1, S] are not [batch, source]
    with pytest.raises(rs.RnnscopeError, match=r"returned a tuple of a tensor of shape \[3, 1, 6\], a tensor of "
                                               r"shape \[3, 1, 5\], which holds no weights over the source"), \
            Probe(model, attention=["attention"]):
        model(src, tgt)
    assert not model.attention._forward_hooks


def test_a_new_batch_or_source_starts_a_new_sequence_and_clear_drops_them():
    model, pick = TutorialDecoder(), {"attention": lambda out: out[1].squeeze(1)}
    with Probe(model, attention=pick) as p:
        model(torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3, 4)))
        model(torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3, 2)))     # same batch and source: steps go on
        assert p.attention["attention"].shape == (3, 6, 5)
        model(torch.randint(0, 10, (3, 7)), torch.randint(0, 10, (3, 4)))     # another source length
        model(torch.randint(0, 10, (4, 7)), torch.randint(0, 10, (4, 3)))     # a larger batch
        with pytest.raises(rs.RnnscopeError, match="recorded 3 sequences"):
            p.attention["attention"]
        assert [tuple(s.shape) for s in p.attention.sequences("attention")] == [(3, 6, 5), (3, 4, 7), (4, 3, 7)]
        p.clear()
        assert p.attention.sequences("attention") == [] and "attention" in p.attention


def test_attention_without_weights_is_refused_in_one_line():
    model, (feats, caps, lengths) = AttendingCaptioner(), captions()
    with pytest.raises(rs.RnnscopeError, match="'decoder.attn' is not a submodule of AttendingCaptioner"):
        Probe(model, attention=["decoder.attn"])
    with pytest.raises(rs.RnnscopeError, match="picker given for attention module 'attention' is a int"):
        Probe(model, attention={"attention": 3})
    # scores before the softmax: a [B, P, 1] tensor, no weights
    with pytest.raises(rs.RnnscopeError, match=r"full_att returned a tensor of shape \[4, 9, 1\], which holds no "
                                               r"weights .* give a picker"), \
            Probe(model, attention=["attention.full_att"]):
        model(feats, caps, lengths)
    # a picker that picks the scores, squeezed: [B, P] but rows are not weights
    with pytest.raises(rs.RnnscopeError, match=r"picker of attention module attention.full_att returned a tensor of "
                                               r"shape \[4, 9\], not weights"), \
            Probe(model, attention={"attention.full_att": lambda out: out.squeeze(2)}):
        model(feats, caps, lengths)
    # a picker that fails: its own error, in one line
    with pytest.raises(rs.RnnscopeError, match="picker of attention module attention: IndexError"), \
            Probe(model, attention={"attention": lambda out: out[5]}):
        model(feats, caps, lengths)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(rs.RnnscopeError) as err, Probe(model, attention=["attention.enc_att"]):
        model(feats, caps, lengths)
    assert "\n" not in str(err.value)
