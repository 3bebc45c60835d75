"""A word-level LSTM language model, shaped like PyTorch's ``examples/word_language_model``, probed by rnnscope.

    python examples/word_lstm.py                 # trains ~1 minute on zoo/samples/shakespeare.txt, saves runs/word_lstm/
    rnnscope probe --model examples/word_lstm.py:load --text rnnscope/zoo/samples/shakespeare.txt --out runs/words

Everything here is the user's own code, nothing of it is rnnscope's: the model (embedding, 2-layer
LSTM, decoder with its weight tied to the embedding, called sequence-first with an explicit
hidden state), a whitespace tokenizer with its own vocabulary, and weights saved with safetensors.
``load()`` is the spec function: it returns ``(model, encode, loss)`` plus ``call``, which tells
rnnscope how to run a model that is not called as ``model(ids [1, T])``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

SHAKESPEARE = Path(__file__).resolve().parent.parent / "zoo" / "samples" / "shakespeare.txt"


def where() -> Path:
    """Where the model is saved and loaded: $WORD_LSTM_DIR, else runs/word_lstm."""
    return Path(os.environ.get("WORD_LSTM_DIR", "runs/word_lstm"))

UNK = "<unk>"


class WordTokenizer:
    """Whitespace words, each with its character span: ``encode(text) -> (ids [1, T], spans [T, 2])``.
    Words outside the vocabulary become ``<unk>`` (id 0) but keep their own span."""

    def __init__(self, words: list[str]):
        self.words = [UNK] + [w for w in words if w != UNK]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_text(cls, text: str, min_count: int = 2) -> "WordTokenizer":
        counts: dict[str, int] = {}
        for w in text.split():
            counts[w] = counts.get(w, 0) + 1
        # words seen once would each get an embedding trained on one example: leave them to <unk>
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def encode(self, text: str):
        found = list(re.finditer(r"\S+", text))
        ids = torch.tensor([[self.index.get(m.group(), 0) for m in found]], dtype=torch.long)
        spans = np.array([m.span() for m in found], dtype=np.int64).reshape(-1, 2)
        return ids, spans

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def __len__(self) -> int:
        return len(self.words)


class RNNModel(nn.Module):
    """word_language_model's RNNModel, LSTM only: input ``[T, B]`` ids, output log-probabilities ``[T, B, V]``."""

    def __init__(self, ntoken: int, ninp: int = 64, nhid: int = 64, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if nhid != ninp:
            raise ValueError("tied weights need nhid == ninp")
        self.decoder.weight = self.encoder.weight      # "Using the Output Embedding to Improve Language Models"
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output))
        return F.log_softmax(decoded, dim=-1), hidden

    def init_hidden(self, bsz: int):
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def call(model: RNNModel, ids: torch.Tensor) -> torch.Tensor:
    """How rnnscope runs the model: ids ``[1, T]`` -> log-probabilities ``[1, T, V]`` (the next-token loss).
    The hidden state is None, not ``init_hidden``'s zeros: rnnscope feeds a long document in chunks and
    carries the state from one to the next only into a call that brings no state of its own."""
    out, _ = model(ids.t(), None)
    return out.transpose(0, 1)


def train(text: str, seconds: float = 60.0, steps: int | None = None, bptt: int = 35, batch: int = 16,
          seed: int = 0, log=print) -> tuple[RNNModel, WordTokenizer]:
    """Truncated BPTT as in word_language_model, for ``seconds`` (or exactly ``steps`` updates)."""
    torch.manual_seed(seed)
    tok = WordTokenizer.from_text(text)
    ids = tok.encode(text)[0][0]
    cols = len(ids) // batch
    data = ids[: cols * batch].view(batch, cols).t().contiguous()      # [cols, batch], as batchify does
    model = RNNModel(len(tok))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    hidden, start, step, pos = model.init_hidden(batch), time.monotonic(), 0, 0
    while (step < steps) if steps is not None else (time.monotonic() - start < seconds):
        if pos + bptt + 1 > len(data):
            hidden, pos = model.init_hidden(batch), 0
        x, y = data[pos: pos + bptt], data[pos + 1: pos + 1 + bptt]
        hidden = tuple(h.detach() for h in hidden)
        out, hidden = model(x, hidden)
        loss = F.nll_loss(out.reshape(-1, len(tok)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25 * 20)
        opt.step()
        step, pos = step + 1, pos + bptt
        if log and step % 100 == 0:
            log(f"step {step}  loss {loss.item():.3f}  ({time.monotonic() - start:.0f} s)")
    return model.eval(), tok


def save(model: RNNModel, tok: WordTokenizer, out: Path | None = None) -> Path:
    out = out or where()
    out.mkdir(parents=True, exist_ok=True)
    # tied weights share storage: safetensors keeps one copy, so save the untied state and re-tie on load
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.weight"}
    save_file(state, str(out / "model.safetensors"))
    (out / "vocab.json").write_text(json.dumps(tok.words))
    return out


def load(out: Path | str | None = None):
    """The spec function for ``rnnscope probe --model examples/word_lstm.py:load``."""
    from rnnscope import RnnscopeError, Subject
    out = Path(out or where())
    if not (out / "model.safetensors").is_file():
        raise RnnscopeError(f"no trained model in {out}", "run `python examples/word_lstm.py` first "
                                                         "(or set WORD_LSTM_DIR to where it saved one)")
    tok = WordTokenizer(json.loads((out / "vocab.json").read_text()))
    model = RNNModel(len(tok))
    state = load_file(str(out / "model.safetensors"))
    state["decoder.weight"] = state["encoder.weight"]
    model.load_state_dict(state)
    return Subject(model.eval(), tok, loss="auto", call=call, name="word-lstm", source=str(out))


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    text = SHAKESPEARE.read_text()
    model, tok = train(text, seconds=seconds)
    print(f"vocabulary {len(tok)} words; saved to {save(model, tok)}")
