"""State keys for the probe: the grammar is the store's (``rnnscope.store.keys``); here only which
modules of a model are recurrent."""
from __future__ import annotations

from torch import nn

from rnnscope.store.keys import parse_key, state_key  # noqa: F401  (one grammar, the store's)

from .families import GRAD_KINDS, KINDS, MODULES, family_name  # noqa: F401  (the kinds by family live in families)


def recurrent_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every nn.RNN / nn.LSTM / nn.GRU inside ``model`` (the model itself is named '')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MODULES)}
