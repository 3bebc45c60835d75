"""State keys, following PyTorch's parameter naming: ``{module}.l{layer}[_reverse].{kind}``."""
from __future__ import annotations

import re

from torch import nn

from .families import GRAD_KINDS, KINDS, MODULES, family  # noqa: F401  (the kinds by family live in families)

KEY = re.compile(r"^(?:(?P<module>.+)\.)?l(?P<layer>\d+)(?P<reverse>_reverse)?\.(?P<kind>\w+)$")


def state_key(module: str, layer: int, reverse: bool, kind: str) -> str:
    """The root module (``model`` itself is an ``nn.LSTM``) has the empty name: its keys read ``l0.c``."""
    return f"{module + '.' if module else ''}l{layer}{'_reverse' if reverse else ''}.{kind}"


def parse_key(key: str) -> dict:
    """``'rnn.l1_reverse.c' -> {module: 'rnn', layer: 1, reverse: True, kind: 'c'}``."""
    m = KEY.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a state key like 'rnn.l0.c'")
    return {"module": m["module"] or "", "layer": int(m["layer"]), "reverse": bool(m["reverse"]), "kind": m["kind"]}


def recurrent_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every nn.RNN / nn.LSTM / nn.GRU inside ``model`` (the model itself is named '')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MODULES)}
