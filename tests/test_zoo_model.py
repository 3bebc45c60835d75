import pytest
import torch

from rnnscope.zoo import Architecture, CharModel, RnnscopeError, matched_hidden, parameter_count


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_parameter_count_matches_the_built_model(arch):
    a = Architecture(arch, 97, 64, 123, 3)
    assert parameter_count(a) == sum(p.numel() for p in CharModel(a).parameters())


def test_matched_widths_give_equal_parameter_counts():
    target = parameter_count(Architecture("lstm", 98, 64, 256, 2))
    for arch in ("rnn", "gru"):
        h = matched_hidden(arch, target, 98, 64, 2)
        assert abs(parameter_count(Architecture(arch, 98, 64, h, 2)) - target) / target < 0.01
    assert matched_hidden("rnn", target, 98, 64, 2) > matched_hidden("gru", target, 98, 64, 2) > 256


def test_forward_shapes_and_carried_state():
    m = CharModel(Architecture("lstm", 10, 4, 6, 2)).eval()
    ids = torch.randint(0, 10, (3, 9))
    logits, state = m(ids, return_state=True)
    assert logits.shape == (3, 9, 10) and state[0].shape == (2, 3, 6)
    # two halves with carried state equal one pass
    a, s = m(ids[:, :4], return_state=True)
    b = m(ids[:, 4:], s)
    assert torch.allclose(torch.cat([a, b], 1), logits, atol=1e-6)
    assert m.rnn is m.get_submodule("rnn")


def test_bad_architecture_is_one_clear_error():
    with pytest.raises(RnnscopeError, match="unknown architecture 'transformer'"):
        Architecture("transformer", 10, 4, 6, 2)
    with pytest.raises(RnnscopeError, match="hidden must be >= 1"):
        Architecture("lstm", 10, 4, 0, 2)
