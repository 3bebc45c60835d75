"""An audio-style model for ``rnnscope probe --frames``: one ``nn.LSTMCell`` called once per frame.

    python examples/frames_lstm.py runs/clips.npz       # writes runs/clips.npz and runs/clips.times.npz
    rnnscope probe --model examples/frames_lstm.py:build --frames runs/clips.npz --times runs/clips.times.npz \\
        --loss examples/frames_lstm.py:loss --grad --dtype float32 --out runs/clips

``build()`` returns the model (no encoder: it takes frames ``[1, T, FEATURES]``). Its unit 0 is planted
to follow input channel 0 (input and output gates open, forget gate shut, candidate ``tanh(x0 / 2)``),
so ``analyze --features examples/frames_lstm.py:features`` finds it; the other units are random.
``loss(output, frames)`` is a per-step ``[T]`` loss: predict channel 1 of each frame.
``features()`` are functions of a document (``name``, ``times``, ``input`` when ``analyze --frames``
gives the frames), each returning one number per frame.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES, UNITS = 3, 6


class CellLoop(nn.Module):
    """``x [1, T, FEATURES]`` -> ``[1, T, 2]``, one ``self.cell`` call per frame."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(FEATURES, UNITS), nn.Linear(UNITS, 2)

    def forward(self, x):
        h = c = x.new_zeros(len(x), UNITS)
        out = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            out.append(h)
        return self.head(torch.stack(out, 1))


def build() -> CellLoop:
    torch.manual_seed(0)
    m = CellLoop()
    with torch.no_grad():           # unit 0 of each gate, in PyTorch's order i, f, g, o
        for gate, bias in ((0, 6.0), (1, -6.0), (3, 6.0)):
            m.cell.weight_ih[gate * UNITS] = m.cell.weight_hh[gate * UNITS] = 0
            m.cell.bias_ih[gate * UNITS], m.cell.bias_hh[gate * UNITS] = bias, 0
        m.cell.weight_ih[2 * UNITS] = torch.tensor([0.5, 0, 0])
        m.cell.weight_hh[2 * UNITS] = 0
        m.cell.bias_ih[2 * UNITS] = m.cell.bias_hh[2 * UNITS] = 0
    return m


def loss(output, frames):
    """``output [1, T, 2]``, ``frames [T, FEATURES]`` -> ``[T]``: squared error predicting channel 1."""
    return (output[0, :, 0] - frames[:, 1]) ** 2


def features() -> dict:
    return {"channel0": lambda d: d["input"][:, 0], "channel0_up": lambda d: d["input"][:, 0] > 0}


def clips(seed: int = 0, docs: int = 4) -> dict:
    """Documents of random frames ``[T, FEATURES]``, name -> array, 60 to 90 frames each."""
    rng = np.random.default_rng(seed)
    return {f"clip{d}": rng.normal(size=(int(rng.integers(60, 90)), FEATURES)).astype(np.float32)
            for d in range(docs)}


def write(path) -> None:
    """The clips as ``path`` (.npz) and their time stamps, 10 to 30 ms apart, beside it (``.times.npz``)."""
    path, x = Path(path), clips()
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **x)
    np.savez(path.with_suffix(".times.npz"), **{k: np.cumsum(rng.uniform(0.01, 0.03, len(v))) for k, v in x.items()})


if __name__ == "__main__":
    write(sys.argv[1])
