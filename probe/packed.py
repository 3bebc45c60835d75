"""``PackedSequence`` input: sequences of different lengths in one batch.

Each layer runs through the fused kernel on the packed data itself, so outputs, final states and
the caller's autograd are PyTorch's own: every sequence ends at its own length, and the reverse
direction starts from each sequence's own last element. The states are then replayed in the
padded layout ``[T, B, *]`` with the batch in the caller's original order (what
``pad_packed_sequence`` gives), the reverse direction reversed within each sequence's length.
Positions past a sequence's end hold NaN: there is no state there.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import families
from .replay import layer_weights


def reversal(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[T, B]`` time index that reverses each sequence within its own length and leaves the
    padding where it is; it is its own inverse."""
    t = torch.arange(T).unsqueeze(1)
    n = lengths.to(torch.long).unsqueeze(0)
    return torch.where(t < n, n - 1 - t, t)


def reverse_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [T, B, *]`` reordered along time by ``index [T, B]`` (from ``reversal``)."""
    return x.gather(0, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def past_end(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[T, B]``: True where step ``t`` lies past sequence ``b``'s end."""
    return torch.arange(T).unsqueeze(1) >= lengths.to(torch.long).unsqueeze(0)


def at_ends(x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x [T, B, *]`` at each sequence's last step ``ends [B]``: ``[B, *]``."""
    return x[ends, torch.arange(x.shape[1])]


def run_layer(module: nn.Module, layer: int, seq: PackedSequence, h0: torch.Tensor, c0: torch.Tensor | None):
    """One layer of ``module`` on packed input. ``h0, c0 [D, B, *]`` in the caller's batch order.
    Returns ``(output PackedSequence, h_n, c_n or None)``, final states in the caller's order."""
    order, back = seq.sorted_indices, seq.unsorted_indices
    sort = (lambda s: s) if order is None else (lambda s: s.index_select(1, order))  # noqa: E731
    unsort = (lambda s: s) if back is None else (lambda s: s.index_select(1, back))  # noqa: E731
    out, h_n, c_n = families.fused(module, seq.data, sort(h0), None if c0 is None else sort(c0),
                                   layer_weights(module, layer), module.bias, module.bidirectional,
                                   module.training, seq.batch_sizes)
    packed = PackedSequence(out, seq.batch_sizes, order, back)
    return packed, unsort(h_n), (unsort(c_n) if c_n is not None else None)


def padded(seq: PackedSequence, T: int) -> torch.Tensor:
    """``[T, B, *]`` in the caller's batch order, zeros past each end."""
    return pad_packed_sequence(seq, total_length=T)[0]


def pack_like(x: torch.Tensor, seq: PackedSequence) -> PackedSequence:
    """``x [T, B, *]`` (padded, the caller's batch order) packed the way ``seq`` is: same batch
    sizes and sort order, so the caller gets back what the module itself would return."""
    order = seq.sorted_indices if seq.sorted_indices is not None else torch.arange(x.shape[1])
    steps = torch.repeat_interleave(torch.arange(len(seq.batch_sizes)), seq.batch_sizes)
    rank = torch.cat([torch.arange(int(n)) for n in seq.batch_sizes])
    return PackedSequence(x[steps, order[rank]], seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices)
