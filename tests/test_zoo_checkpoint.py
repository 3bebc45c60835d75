import json
import pickle

import pytest
import torch

from rnnscope import zoo
from rnnscope.zoo import Architecture, CharModel, RnnscopeError


def test_roundtrip_restores_weights_and_vocab(tiny_checkpoint, tiny_vocab):
    ck = zoo.load(tiny_checkpoint)
    model, vocab = ck.model, ck.vocab
    assert vocab == tiny_vocab and not model.training
    torch.manual_seed(0)
    again = CharModel(Architecture("lstm", len(tiny_vocab), 8, 16, 2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert ck.card["params"] == sum(p.numel() for p in model.parameters())


def test_unknown_zoo_name_lists_the_known_ones():
    with pytest.raises(RnnscopeError, match="unknown zoo checkpoint 'nope'.*lstm-linux"):
        zoo.load("zoo:nope")


def test_missing_path():
    with pytest.raises(RnnscopeError, match="does not exist"):
        zoo.load("/no/such/checkpoint")


def test_truncated_weights_are_caught_by_checksum(tiny_checkpoint):
    w = tiny_checkpoint / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(RnnscopeError, match="corrupt or truncated.*SHA-256"):
        zoo.load(tiny_checkpoint)


def test_flipped_byte_is_caught(tiny_checkpoint):
    w = tiny_checkpoint / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(RnnscopeError, match="corrupt or truncated"):
        zoo.load(tiny_checkpoint)


def test_corrupt_card(tiny_checkpoint):
    (tiny_checkpoint / "card.json").write_text("{not json")
    with pytest.raises(RnnscopeError, match="card.json is corrupt"):
        zoo.load(tiny_checkpoint)


def test_card_with_wrong_architecture(tiny_checkpoint):
    card = json.loads((tiny_checkpoint / "card.json").read_text())
    card["architecture"]["hidden"] = 32
    (tiny_checkpoint / "card.json").write_text(json.dumps(card))
    with pytest.raises(RnnscopeError, match=r"does not match architecture lstm 2x32.*weight_ih_l0 is \[64, 8\]"):
        zoo.load(tiny_checkpoint)


def test_truncated_bare_safetensors_without_card(tiny_checkpoint, tiny_vocab):
    w = tiny_checkpoint / "weights.safetensors"
    bare = tiny_checkpoint.parent / "bare.safetensors"
    bare.write_bytes(w.read_bytes()[:100])
    with pytest.raises(RnnscopeError, match="bare.safetensors is corrupt or truncated"):
        zoo.load(bare, arch="lstm", vocab=tiny_vocab.chars, embed=8, hidden=16, layers=2)


def test_plain_state_dict_with_user_architecture(tmp_path, tiny_vocab):
    m = CharModel(Architecture("gru", len(tiny_vocab), 8, 12, 1))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    model = zoo.load(tmp_path / "m.pt", arch="gru", vocab=tiny_vocab.chars, embed=8, hidden=12, layers=1).model
    assert torch.equal(model.rnn.weight_hh_l0, m.rnn.weight_hh_l0)
    with pytest.raises(RnnscopeError, match="bare weights file with no card"):
        zoo.load(tmp_path / "m.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_run(tmp_path, tiny_vocab, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(RnnscopeError, match="corrupt or truncated"):
        zoo.load(tmp_path / "evil.pt", arch="lstm", vocab=tiny_vocab.chars, embed=8, hidden=16, layers=2)
    assert "pwned" not in capsys.readouterr().out


def test_interrupted_save_leaves_the_old_checkpoint_intact(tiny_checkpoint, monkeypatch, tiny_vocab):
    before = (tiny_checkpoint / "weights.safetensors").read_bytes()
    import rnnscope.zoo.checkpoint as C

    def dies(tensors, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        C.save(CharModel(Architecture("lstm", len(tiny_vocab), 8, 16, 2)), tiny_vocab, {}, tiny_checkpoint)
    assert (tiny_checkpoint / "weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["card.json", "weights.safetensors"]
    zoo.load(tiny_checkpoint)


def test_every_shipped_checkpoint_loads_and_has_measured_losses():
    names = zoo.shipped()
    assert {f"{a}-{c}" for a in ("rnn", "lstm", "gru") for c in ("linux", "shakespeare")} <= set(names)
    for name in names:
        ck = zoo.load(f"zoo:{name}")
        assert ck.card["test_loss"] > 0 and ck.card["val_loss"] > 0
        assert ck.card["corpus"]["train_sha256"] and ck.card["training"]["grad_norm_preclip"]
