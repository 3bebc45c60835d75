"""A translation-like model written as a step loop with attention, trained to reverse short strings, probed by rnnscope.

    python examples/attention_loop.py      # trains ~20 s ($ATTENTION_LOOP_STEPS, default 600), writes runs/reverse/

Everything in the model is the user's own code: a bidirectional ``nn.GRU`` encoder over the source
letters, then a decoder that calls an ``nn.LSTMCell`` once per target letter (teacher forcing), with
additive attention over the encoder's states before each call. The task, writing the source
backwards, makes the right attention known: target step t must look at source position T-1-t.
The data is generated here (random lowercase strings), so nothing needs downloading.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BOS = 0                                          # the decoder's first input; letters are 1..26


def encode(text: str) -> torch.Tensor:
    """``text`` (lowercase letters) -> ids ``[1, T]``, one per character."""
    return torch.tensor([[ALPHABET.index(ch) + 1 for ch in text]])


def reverse_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-step loss ``[T]`` of ``logits [1, T, V]`` against the source ``ids [T]`` reversed."""
    return F.cross_entropy(logits[0], ids.flip(0), reduction="none")


class Attention(nn.Module):
    """Additive (Bahdanau) attention: ``(h [B, H], enc [B, S, 2H]) -> (context [B, 2H], weights [B, S])``."""

    def __init__(self, H: int):
        super().__init__()
        self.query, self.key, self.score = nn.Linear(H, H), nn.Linear(2 * H, H), nn.Linear(H, 1)

    def forward(self, h, enc):
        weights = self.score(torch.tanh(self.query(h).unsqueeze(1) + self.key(enc))).squeeze(2).softmax(1)
        return torch.einsum("bs,bsh->bh", weights, enc), weights


class Reverser(nn.Module):
    """ids ``[B, T]`` -> logits ``[B, T, V]`` for the reversed string: one ``LSTMCell`` call per target letter."""

    def __init__(self, V: int = len(ALPHABET) + 1, E: int = 16, H: int = 32):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.encoder = nn.GRU(E, H, batch_first=True, bidirectional=True)
        self.attention, self.cell = Attention(H), nn.LSTMCell(E + 2 * H, H)
        self.out = nn.Linear(3 * H, V)

    def forward(self, ids):
        enc, _ = self.encoder(self.embed(ids))                       # [B, T, 2H]
        prev = torch.cat([torch.full_like(ids[:, :1], BOS), ids.flip(1)[:, :-1]], 1)   # teacher forcing
        state, h, logits = None, enc.new_zeros(len(ids), self.cell.hidden_size), []
        for t in range(ids.shape[1]):
            context, _ = self.attention(h, enc)
            state = self.cell(torch.cat([self.embed(prev[:, t]), context], 1), state)
            h = state[0]
            logits.append(self.out(torch.cat([h, context], 1)))
        return torch.stack(logits, 1)


def batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random strings of one random length (3 to 9 letters) as ids ``[n, T]``."""
    T = int(torch.randint(3, 10, (1,), generator=gen))
    return torch.randint(1, len(ALPHABET) + 1, (n, T), generator=gen)


def train(steps: int | None = None, seed: int = 0):
    """Adam on batches of 64 for ``steps`` steps ($ATTENTION_LOOP_STEPS, else 600).
    Returns ``(model, losses)``, ``losses`` the mean loss of each step."""
    steps = int(os.environ.get("ATTENTION_LOOP_STEPS", 600)) if steps is None else steps
    torch.manual_seed(seed)
    gen, model = torch.Generator().manual_seed(seed), Reverser()
    opt, losses = torch.optim.Adam(model.parameters(), lr=3e-3), []
    for _ in range(steps):
        ids = batch(64, gen)
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flip(1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def main(out: str = "runs/reverse") -> None:
    import rnnscope as rs
    start = time.time()
    model, losses = train()
    print(f"trained {len(losses)} steps in {time.time() - start:.0f} s: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    text = "attention"
    with rs.Probe(model, grad=True, attention=["attention"]) as p:
        reverse_loss(model(encode(text)), encode(text)[0]).sum().backward()
    w = p.attention["attention"][0]                                  # [steps, source positions]
    print("step t looks at source position", w.argmax(1).tolist(), "(reversing: T-1-t)")
    print("cell keys:", ", ".join(k for k in p.trace if k.startswith("cell.")))
    run = rs.record(rs.Subject(model, encode, loss=reverse_loss), ["recurrent", "attention", "loops"], out,
                    grad=True, overwrite=True, progress=False)
    print(f"{len(run)} steps in {out}:", ", ".join(sorted(run.keys())))


if __name__ == "__main__":
    main(*sys.argv[1:])
