"""1. A word-level LSTM language model (word_language_model's shape: embedding, 2-layer LSTM, tied
decoder, sequence-first with its own hidden state) with its own whitespace tokenizer: the README's
examples/word_lstm.py, trained for 60 updates instead of a minute."""
import sys
from pathlib import Path

from rnnscope.probe.subject import Subject

sys.path.insert(0, str(Path(__file__).resolve().parent))   # loaded by path: import foreign_kit beside it
import foreign_kit as kit  # noqa: E402


@kit.once
def trained():
    """(the example's module, model, tokenizer), trained once per process."""
    example = kit.load_file(kit.EXAMPLES / "word_lstm.py")
    with kit.one_thread():
        model, tok = example.train(kit.sample("shakespeare.txt"), steps=60, log=None)
    return example, model, tok


def load() -> Subject:
    example, model, tok = trained()
    return Subject(model, tok, loss="auto", call=example.call, name="word-lstm")
