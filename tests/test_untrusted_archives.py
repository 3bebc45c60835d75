"""Issue 24, a TorchScript archive is someone else's code: rnnscope replays only arithmetic.

Each crafted archive here really does what it says when torch runs it (the test shows the file it
writes appear), and rnnscope refuses it in one line naming the operator and the archive, before a
single node runs: nothing on disk changes and nothing hangs.
"""
import subprocess
import sys
import time
from typing import Tuple

import pytest
import torch
from torch import nn

from rnnscope.errors import RnnscopeError
from rnnscope.probe import specs as models


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.rnn = nn.GRU(4, 5, batch_first=True)


IDS = torch.tensor([[1, 2, 3, 4, 5]])


class Writer(Base):
    """Its forward writes 24 bytes into the file ``where`` through shared storage."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def forward(self, ids):
        hit = torch.from_file(self.where, shared=True, size=6).fill_(80)
        return self.rnn(self.embed(ids))[0] + 0 * hit.sum()


def _save(tmp_path, model, name="m.pt"):
    path = tmp_path / name
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def _refused(path, *words):
    with pytest.raises(RnnscopeError) as e:
        models.archive(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg
    return msg


def test_a_forward_writing_a_file_through_shared_storage_is_refused_before_it_runs(tmp_path):
    target = str(tmp_path / "bashrc")

    path = _save(tmp_path, Writer(target))
    torch.jit.load(str(path))(IDS)                       # what torch itself does with this archive
    assert (tmp_path / "bashrc").read_bytes() == torch.full((6,), 80.0).numpy().tobytes()
    (tmp_path / "bashrc").unlink()
    _refused(path, "aten::from_file")
    assert not (tmp_path / "bashrc").exists()


def test_a_file_read_into_the_output_is_refused(tmp_path):
    (tmp_path / "secret").write_bytes(b"\x01" * 64)

    class Reader(Base):
        def __init__(self, where: str):
            super().__init__()
            self.where = where

        def forward(self, ids):
            leak = torch.from_file(self.where, shared=False, size=16)
            return self.rnn(self.embed(ids))[0] + leak.sum()

    _refused(_save(tmp_path, Reader(str(tmp_path / "secret"))), "aten::from_file")


def test_torch_save_inside_forward_is_refused(tmp_path):
    class Saver(Base):
        def __init__(self, where: str):
            super().__init__()
            self.where = where

        def forward(self, ids):
            out = self.rnn(self.embed(ids))[0]
            torch.save(out, self.where)
            return out

    path = _save(tmp_path, Saver(str(tmp_path / "saved")))
    _refused(path, "aten::save")
    assert not (tmp_path / "saved").exists()


def test_load_time_code_is_refused_before_torch_jit_load(tmp_path):
    target = str(tmp_path / "hit")

    class Trap(nn.Module):                             # a leaf: its __setstate__ sets every field
        def __init__(self, where: str):
            super().__init__()
            self.where = where
            self.hit = torch.zeros(1)

        @torch.jit.export
        def __getstate__(self) -> Tuple[str, bool]:
            return (self.where, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[str, bool]) -> None:
            self.where, self.training = state[0], state[1]
            self.hit = torch.from_file(self.where, shared=True, size=4).fill_(1)

        def forward(self, x):
            return x

    class Setstate(Base):
        def __init__(self, where: str):
            super().__init__()
            self.trap = Trap(where)

        def forward(self, ids):
            return self.trap(self.rnn(self.embed(ids))[0])

    path = _save(tmp_path, Setstate(target))
    assert not (tmp_path / "hit").exists()
    torch.jit.load(str(path))                          # torch's loader runs __setstate__: the file appears
    assert (tmp_path / "hit").exists()
    (tmp_path / "hit").unlink()
    _refused(path, "__setstate__")
    assert not (tmp_path / "hit").exists()


def test_a_custom_library_operator_is_refused(tmp_path):
    lib = torch.library.Library("rnnscope_untrusted", "DEF")
    lib.define("leak(Tensor x) -> Tensor")
    lib.impl("leak", lambda x: x * 2, "CPU")

    class Custom(Base):
        def forward(self, ids):
            return torch.ops.rnnscope_untrusted.leak(self.rnn(self.embed(ids))[0])

    _refused(_save(tmp_path, Custom()), "rnnscope_untrusted::leak")


def test_in_place_writes_to_an_input_or_a_parameter_are_refused_but_not_to_its_own_values(tmp_path):
    class OnInput(Base):
        def forward(self, ids):
            ids.add_(1)
            return self.rnn(self.embed(ids))[0]

    class OnParameter(Base):
        def forward(self, ids):
            self.embed.weight.view(-1).mul_(2)
            return self.rnn(self.embed(ids))[0]

    class OnItsOwn(Base):
        def forward(self, ids):
            out = self.rnn(self.embed(ids))[0].clone()
            out.mul_(2)
            return torch.relu_(out)

    _refused(_save(tmp_path, OnInput(), "a.pt"), "in place", "aten::add_")
    _refused(_save(tmp_path, OnParameter(), "b.pt"), "in place", "aten::mul_")
    own = OnItsOwn().eval()
    replayed = models.archive(_save(tmp_path, own, "c.pt"))
    assert torch.equal(replayed(IDS), own(IDS))


def test_a_loop_that_never_ends_meets_the_step_budget(tmp_path):
    class Forever(Base):
        def forward(self, ids):
            x = self.rnn(self.embed(ids))[0]
            n = 0
            while n >= 0:
                n = n + 1
            return x

    replayed = models.archive(_save(tmp_path, Forever()))
    t = time.perf_counter()
    with pytest.raises(RnnscopeError, match="step budget"):
        replayed(IDS)
    assert time.perf_counter() - t < 30


def test_a_loop_in_a_submodule_without_an_rnn_is_replayed_under_the_budget_too(tmp_path):
    class Spin(nn.Module):
        def forward(self, x):
            n = 0
            while n >= 0:
                n = n + 1
            return x

    class Outer(Base):
        def __init__(self):
            super().__init__()
            self.spin = Spin()

        def forward(self, ids):
            return self.spin(self.rnn(self.embed(ids))[0])

    with pytest.raises(RnnscopeError, match="step budget"):
        models.archive(_save(tmp_path, Outer()))(IDS)


def test_probe_refuses_a_writing_archive_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "enc.py").write_text("import torch\ndef encoder():\n"
                                     "    return lambda text: torch.tensor([[ord(c) % 16 for c in text]])\n")
    (tmp_path / "t.txt").write_text("hello world\n")

    path = _save(tmp_path, Writer(str(tmp_path / "bashrc")))
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", "probe", str(path), "--encoder",
                           f"{tmp_path / 'enc.py'}:encoder", "--text", str(tmp_path / "t.txt"), "--out",
                           str(tmp_path / "run"), "--loss", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "aten::from_file" in proc.stderr
    assert not (tmp_path / "bashrc").exists() and not (tmp_path / "run").exists()


def test_a_truncated_archive_is_called_truncated_not_code_free(tmp_path):
    path = _save(tmp_path, _Plain())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RnnscopeError, match="damaged or truncated zip") as e:
        models.archive(cut)
    assert "no compiled code" not in str(e.value)


class _Plain(Base):
    def forward(self, ids):
        return self.rnn(self.embed(ids))[0]
