"""How gradients survive storage: float16, float16 with one scale per key (the best power of two), float32.

A small LSTM classifier (the label is read at the last step of each review) is trained for a few
seconds; ``grad_h`` of its cross-entropy is recorded in float32 and stored each way. Prints, per
way, the share of non-zero gradients that become zero, that become subnormal, and the worst
relative error of the rest.   python benchmarks/grad_storage.py
"""
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rnnscope import probe

V, H = 30, 32


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(V, 16), nn.LSTM(16, H, batch_first=True), nn.Linear(H, 2)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


def reviews(n: int, rng):
    """Short documents (20-60 ids); label 1 when id 3 appears more often than id 4."""
    docs = [rng.integers(1, V, rng.integers(20, 60)) for _ in range(n)]
    return docs, [int((d == 3).sum() > (d == 4).sum()) for d in docs]


def scale_of(g: np.ndarray, how: str) -> float:
    """The factor applied before the cast: one power of two per key bringing the largest |g| near 2^15."""
    return 2.0 ** (15 - np.ceil(np.log2(np.abs(g).max()))) if "scale" in how else 1.0


def stored(g: np.ndarray, how: str) -> np.ndarray:
    """``g`` as read back after storing it ``how``, and whether each value was stored subnormal."""
    if how == "float32":
        return g.astype(np.float32).astype(np.float64), np.abs(g) < np.finfo(np.float32).tiny
    k = scale_of(g, how)
    return (g * k).astype(np.float16).astype(np.float64) / k, np.abs(g * k) < np.finfo(np.float16).tiny


def main():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    docs, labels = reviews(400, rng)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(3):
        for d, y in zip(docs, labels):
            loss = F.cross_entropy(model(torch.tensor(d)[None]), torch.tensor([y]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    grads = []
    for d, y in zip(docs, labels):
        with probe.Probe(model, grad=True) as p:
            F.cross_entropy(model(torch.tensor(d)[None]), torch.tensor([y])).backward()
        grads.append(p.trace["lstm.l0.grad_h"][0].double().numpy())
    g = np.concatenate(grads)
    nz = g != 0
    print(f"{nz.sum():,} non-zero grad_h values, median |g| {np.median(np.abs(g[nz])):.2e}, "
          f"min {np.abs(g[nz]).min():.2e}, max {np.abs(g).max():.2e}")
    for how in ("float16", "float16 + scale per key", "float32"):
        s, small = stored(g, how)
        zero = s[nz] == 0
        rel = np.abs(s[nz][~zero] - g[nz][~zero]) / np.abs(g[nz][~zero])
        print(f"{how:>24}: zero {zero.mean():.1%}, subnormal {(small[nz] & ~zero).mean():.1%}, "
              f"worst relative error {rel.max():.1e}")


if __name__ == "__main__":
    main()
