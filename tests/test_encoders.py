"""Encoders: what users already have (a vocabulary, a str -> ids function, an encode method, a tokenizer
with offsets) becomes ids and character spans, checked before anything is recorded."""
import re

import numpy as np
import pytest
import torch

from rnnscope.errors import RnnscopeError
from rnnscope.probe.encoders import as_encoder, char_spans


class WordTokenizer:
    """A whitespace word tokenizer with its own vocabulary and BOS / EOS steps (no text)."""
    BOS, EOS, UNK = 0, 1, 2

    def __init__(self, corpus: str):
        self.words = ["<bos>", "<eos>", "<unk>"] + sorted(set(corpus.split()))
        self.index = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str):
        found = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        ids = [self.BOS] + [self.index.get(text[a:b], self.UNK) for a, b in found] + [self.EOS]
        return torch.tensor(ids), np.array([(-1, -1), *found, (-1, -1)], np.int64)

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)


class SubwordTokenizer:
    """Greedy longest-match subwords over a fixed piece list, called the way Hugging Face tokenizers are:
    ``tok(text, return_offsets_mapping=True) -> {"input_ids", "offset_mapping"}``, with [CLS] and [SEP]
    special tokens whose offsets are (0, 0)."""
    name_or_path = "toy-subword"

    def __init__(self, pieces=("th", "the", "e", "t", "h", "a", "c", "at", "s", " ", "n", "i", "o", "r")):
        self.pieces = ["[CLS]", "[SEP]", "[UNK]"] + list(pieces)
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        ids, offsets, i = [0], [(0, 0)], 0
        while i < len(text):
            n = max((k for k in range(1, min(4, len(text) - i + 1)) if text[i:i + k] in self.index), default=1)
            ids.append(self.index.get(text[i:i + n], 2))
            offsets.append((i, i + n))
            i += n
        ids.append(1)
        offsets.append((0, 0))
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids) -> str:
        return "".join(self.pieces[int(i)] for i in ids)


def test_a_zoo_vocabulary_is_one_step_per_character(tiny_vocab):
    enc = as_encoder(tiny_vocab)
    ids, spans = enc.encode("if (x)")
    assert torch.equal(ids, tiny_vocab.encode("if (x)")[0]) and enc.kind == "char" and enc.decode(ids) == "if (x)"
    np.testing.assert_array_equal(spans, [[i, i + 1] for i in range(6)])


def test_a_str_to_ids_function_must_give_one_id_per_character():
    enc = as_encoder(lambda s: torch.tensor([[ord(c) for c in s]]))        # [1, T] is taken as [T]
    ids, spans = enc.encode("héllo")
    assert ids.tolist() == [ord(c) for c in "héllo"] and enc.kind == "char"
    np.testing.assert_array_equal(spans, char_spans(5))
    with pytest.raises(RnnscopeError, match=r"4 ids for 5 characters and no spans.*return \(ids, spans\)"):
        as_encoder(lambda s: list(range(len(s) - 1))).encode("hello")


def test_a_byte_level_encoder_gives_several_steps_one_character():
    def utf8(text):
        ids, spans = [], []
        for i, c in enumerate(text):
            for b in c.encode():
                ids.append(b)
                spans.append((i, i + 1))
        return ids, spans
    enc = as_encoder(utf8)
    ids, spans = enc.encode("aé€")
    assert ids.tolist() == list("aé€".encode()) and enc.kind == "spans"
    np.testing.assert_array_equal(spans, [[0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [2, 3]])


def test_an_object_with_encode_gives_words_and_steps_without_text():
    tok = WordTokenizer("the cat sat")
    enc = as_encoder(tok)
    ids, spans = enc.encode("the  dog sat\n")
    assert ids.tolist() == [0, tok.index["the"], 2, tok.index["sat"], 1] and enc.kind == "spans"
    np.testing.assert_array_equal(spans, [[-1, -1], [0, 3], [5, 8], [9, 12], [-1, -1]])
    assert enc.name == "WordTokenizer" and enc.decode([3]) == tok.words[3]


def test_a_tokenizer_with_offsets_has_its_special_tokens_mapped_to_no_text():
    enc = as_encoder(SubwordTokenizer())
    ids, spans = enc.encode("the cat")
    assert enc.name == "toy-subword" and enc.kind == "spans"
    assert [SubwordTokenizer().pieces[i] for i in ids.tolist()] == ["[CLS]", "the", " ", "c", "at", "[SEP]"]
    np.testing.assert_array_equal(spans, [[-1, -1], [0, 3], [3, 4], [4, 5], [5, 7], [-1, -1]])


BAD = {
    "mismatched lengths": (lambda s: ([1, 2, 3], [(0, 1), (1, 2)]), r"3 ids but 2 spans"),
    "span past the end": (lambda s: ([1, 2], [(0, 1), (1, 9)]), r"\(1, 9\) at step 1 is outside the text's 3"),
    "negative start": (lambda s: ([1, 2], [(-2, 1), (1, 2)]), r"\(-2, 1\) at step 0 is outside"),
    "empty span": (lambda s: ([1, 2], [(0, 1), (2, 2)]), r"\(2, 2\) at step 1 is not start < end.*\(-1, -1\)"),
    "out of order": (lambda s: ([1, 2, 3], [(1, 2), (-1, -1), (0, 1)]), r"\(0, 1\) at step 2 goes back"),
    "float ids": (lambda s: torch.ones(3), r"ids of torch.float32 \[3\], not whole numbers"),
    "no steps": (lambda s: ([], np.zeros((0, 2), np.int64)), r"no steps for a document"),
    "negative id": (lambda s: [1, -3, 2], r"negative id -3"),
    "not ids at all": (lambda s: "abc", r"returned str, not ids"),
    "spans of floats": (lambda s: ([1, 2, 3], np.zeros((3, 2))), r"spans of shape \[3, 2\] \(float64\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_encoding_is_one_line(case):
    fn, message = BAD[case]
    with pytest.raises(RnnscopeError, match=message) as err:
        as_encoder(fn).encode("abc")
    assert "\n" not in str(err.value)


def test_what_is_not_an_encoder_is_refused():
    with pytest.raises(RnnscopeError, match="int is not an encoder"):
        as_encoder(7)
