"""What a TorchScript archive may run: arithmetic, and nothing that reaches outside the forward pass.

An archive is someone else's compiled code. ``torch.jit.load`` would run its ``forward`` with the
user's rights (``torch.from_file(path, shared=True).fill_(..)`` writes any file the user can), so
``probe.torchscript`` replays the graph only after ``check`` has read every node of it, every method
and function it calls inlined: each operator must be on the allow-list below (tensor arithmetic,
activations, reductions, shape and indexing ops, the recurrent kernels, control flow), and an
in-place operator may only write a value the graph made itself, never an input or a parameter.
Anything else is refused in one line naming the operator, before a single node runs. A loop is
replayed under a step budget (``budget``), so a loop that never ends is refused, not waited for.
"""
from __future__ import annotations

import re

import torch

from rnnscope.errors import RnnscopeError, escaped

# control flow and the containers TorchScript builds; no prim::SetAttr (it changes the archive
# between calls), no prim::Print, no prim::CallMethod left after inlining (an interface call: unknown code)
PRIM = {"Constant", "GetAttr", "If", "Loop", "TupleConstruct", "TupleUnpack", "TupleIndex", "ListConstruct",
        "ListUnpack", "DictConstruct", "RaiseException", "Uninitialized", "unchecked_cast", "device", "dtype",
        "NumToTensor", "min", "max", "shape", "isinstance", "is_cuda", "layout"}
# pure functions of their arguments (a fresh output, or a view of an input), by base name
ATEN = set("""
add sub mul div neg pow rsub true_divide floor_divide remainder fmod abs exp exp2 expm1 log log2 log10 log1p
sqrt rsqrt reciprocal sign floor ceil round trunc frac clamp clamp_min clamp_max clip lerp addcmul addcdiv
matmul mm bmm addmm addmv baddbmm mv dot linear bilinear einsum outer
sigmoid tanh relu relu6 gelu elu selu celu leaky_relu hardtanh hardsigmoid hardswish silu mish softplus
softsign logsigmoid tanhshrink glu prelu threshold softmax log_softmax _softmax _log_softmax
sum mean prod max min amax amin argmax argmin norm std var logsumexp cumsum cumprod all any
embedding embedding_bag dropout feature_dropout alpha_dropout layer_norm group_norm batch_norm instance_norm
native_layer_norm rms_norm one_hot
lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell _pack_padded_sequence
_pad_packed_sequence
view reshape view_as reshape_as permute transpose t contiguous flatten unflatten unsqueeze squeeze expand
expand_as repeat repeat_interleave select slice narrow index_select gather index masked_fill masked_select
where chunk split split_with_sizes tensor_split unbind cat concat stack hstack vstack flip roll tril triu
diagonal diag movedim swapaxes take_along_dim nonzero sort argsort topk unique_consecutive pad
constant_pad_nd size dim numel len __getitem__ __contains__ list tuple append extend insert pop keys values
items __range_length __derive_index format str
zeros ones full empty zeros_like ones_like full_like empty_like new_zeros new_ones new_full new_empty arange
tensor scalar_tensor as_tensor _shape_as_tensor to type_as detach clone float double half int long bool
eq ne lt gt le ge __and__ __or__ __xor__ __not__ logical_and logical_or logical_not logical_xor bitwise_not
__is__ __isnot__ isnan isinf isfinite nan_to_num is_floating_point item Int Float Bool IntImplicit
FloatImplicit ScalarImplicit Scalar floordiv mul_ add_ sub_ div_ masked_fill_ copy_ zero_ fill_ relu_ tanh_
sigmoid_ clamp_ index_put_ _set_item dropout_ dict
""".split())
# in-place overloads write their first argument (``add_``, ``copy_``); ``_set_item`` writes a list or dict
INPLACE = re.compile(r"[a-z0-9]_$|^_set_item$|^append$|^extend$|^insert$|^pop$")
# ops that return (a view of) their input: a view of a parameter, written in place, writes the parameter
VIEWS = {"view", "reshape", "view_as", "reshape_as", "permute", "transpose", "t", "contiguous", "flatten",
         "unflatten", "unsqueeze", "squeeze", "expand", "expand_as", "select", "slice", "narrow", "chunk", "split",
         "split_with_sizes", "tensor_split", "unbind", "diagonal", "movedim", "swapaxes", "detach", "to",
         "type_as", "float", "double", "half", "int", "long", "bool", "__getitem__", "list", "alias"}
# nodes one forward call may run, per element of its tensor inputs, plus a floor: a char model replays
# about 30 nodes per call and a scripted step loop about 20 per step, ten times below this; a loop that
# never ends reaches it in seconds (measured: 21,000 nodes of a spinning loop in 6.8 s on a shared core)
STEPS_PER_ELEMENT, STEPS_FLOOR = 200, 20_000


def _name(kind: str) -> str:
    return kind.split("::", 1)[1]


def check(module: torch.jit.ScriptModule, where: str) -> None:
    """Refuse, in one line naming the operator and ``where``, an archive whose ``forward`` (with every
    method and function it calls) runs anything but the allow-list, or writes an input or a parameter."""
    try:
        graph = module.forward.inlined_graph
    except (AttributeError, RuntimeError) as err:
        raise RnnscopeError(f"the TorchScript archive {where} has no forward rnnscope can read ({err})",
                            "script a model with a forward method") from None
    _walk(graph, {v.unique() for v in graph.inputs()}, where)    # the caller's values and the archive itself


def _walk(block, outside: set, where: str) -> None:
    """Check every node of ``block``; ``outside`` grows with the values that are (views of) an input or
    a parameter, which no in-place operator may write."""
    for node in block.nodes():
        kind = node.kind()
        space = kind.split("::", 1)[0]
        allowed = (space == "prim" and _name(kind) in PRIM) or (space == "aten" and _name(kind) in ATEN)
        if not allowed:
            raise RnnscopeError(f"the TorchScript archive {where} calls {escaped(kind, limit=80)}, which is not "
                                "arithmetic on tensors; rnnscope replays only side-effect-free operators",
                                "record the eager model through a spec file (file.py:fn) instead: a spec is "
                                "your own code and may run anything")
        ins = [v.unique() for v in node.inputs()]
        if space == "aten" and INPLACE.search(_name(kind)) and ins and ins[0] in outside:
            raise RnnscopeError(f"the TorchScript archive {where} writes its input or a parameter in place "
                                f"({escaped(kind, limit=80)})", "record the eager model through a spec file "
                                "(file.py:fn) instead")
        if kind == "prim::Loop" and any(i in outside for i in ins):
            for b in node.blocks():
                outside.update(v.unique() for v in b.inputs())
        for b in node.blocks():
            _walk(b, outside, where)
        aliased = (kind == "prim::GetAttr"                         # a parameter, a buffer or a submodule
                   or (any(i in outside for i in ins) and (_name(kind) in VIEWS or space == "prim")
                       and kind not in ("prim::If", "prim::Loop"))
                   or any(v.unique() in outside for b in node.blocks() for v in b.outputs()))
        if aliased:
            outside.update(v.unique() for v in node.outputs())


def budget(args) -> int:
    """How many nodes one replayed forward call on ``args`` may run."""
    elements = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    return STEPS_FLOOR + STEPS_PER_ELEMENT * elements
