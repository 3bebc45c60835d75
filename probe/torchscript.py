"""TorchScript archives: record a model whose recurrent modules are compiled.

The layer engine records a module by replacing its ``forward`` (``probe.engine``); a ScriptModule's
compiled forward cannot be replaced. So each scripted ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` is rebuilt
as an eager module from its parameters (hyperparameters from their shapes and names, ``batch_first``
and dropout from the constants of its own ``aten::gru`` / ``aten::lstm`` / ``aten::rnn_*`` call), and
the archive's ``forward`` graph is replayed node by node: every aten op runs as the same
``torch.ops`` overload the graph names, a call into a submodule without recurrent modules runs
compiled, and a call into a recurrent module runs its eager rebuild, which a Probe can patch. The
replay is ordinary autograd, so gradients flow through it. ``tests/test_models_spec.py`` checks
that the replayed output equals the archive's own, bit for bit. An archive is someone else's code:
before a node runs, ``probe.archive_ops`` checks that it runs only arithmetic (no file, storage,
process or print operator, no write into its input or parameters), and a replayed call runs under a
step budget; a submodule is run compiled only when it holds no loop.
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import torch
from torch import nn

from rnnscope.errors import RnnscopeError, escaped, first_line

from . import archive_ops

RECURRENT = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
KERNELS = {"aten::lstm": "LSTM", "aten::gru": "GRU", "aten::rnn_tanh": "RNN", "aten::rnn_relu": "RNN"}
# the dense overloads' arguments: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
# batch_first); the packed overloads have batch_sizes second and no batch_first
DROPOUT, BATCH_FIRST = 5, 8


# a TorchScript archive's compiled source, read before torch.jit.load: its size bounds the read
CODE_LIMIT = 64 * 2**20


def is_archive(path: Path) -> bool:
    """A TorchScript archive is a zip holding compiled code (``*/code/``); a ``torch.save`` file holds none."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_archive(path: Path) -> torch.jit.ScriptModule:
    if not is_archive(path) and _zip_head(path):
        raise RnnscopeError(f"{path} is a damaged or truncated zip (a TorchScript archive's container cannot "
                            "be read)", "copy or save the archive again")
    if not is_archive(path):
        raise RnnscopeError(f"{path} is not a TorchScript archive (no compiled code inside)",
                            "save it with torch.jit.save(torch.jit.script(model), path), or give a state_dict "
                            "with its builder: weights.pt@file.py:build")
    _no_load_time_code(path)
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:       # torch's own loader: a damaged or incompatible archive
        first = first_line(err)
        raise RnnscopeError(f"{path} cannot be loaded by torch.jit.load ({first})",
                            "save it again with torch.jit.save from this PyTorch version") from None
    if getattr(archive, "original_name", None) not in RECURRENT:    # one scripted RNN: only its weights are used
        archive_ops.check(archive, str(path))
    return archive


def _zip_head(path: Path) -> bool:
    """Whether the file starts as a zip does (``PK\\x03\\x04``) but cannot be read as one: cut short
    (``torch.save`` files are zips too, whole ones, without code)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        zipfile.ZipFile(path).close()
        return False
    except zipfile.BadZipFile:
        return True
    except OSError:
        return False


def _no_load_time_code(path: Path) -> None:
    """``torch.jit.load`` runs a module's ``__setstate__`` while loading, before anything could check its
    graph: an archive that defines one is refused from its source text, unloaded."""
    with zipfile.ZipFile(path) as z:
        code = [i for i in z.infolist() if "/code/" in i.filename and i.filename.endswith(".py")]
        if sum(i.file_size for i in code) > CODE_LIMIT:
            raise RnnscopeError(f"{path} holds more than {CODE_LIMIT >> 20} MB of compiled code",
                                "record the eager model through a spec file (file.py:fn) instead")
        for i in code:
            if b"__setstate__" in z.read(i):
                raise RnnscopeError(f"the TorchScript archive {path} defines __setstate__ "
                                    f"({escaped(i.filename, limit=120)}), code torch.jit.load would run",
                                    "record the eager model through a spec file (file.py:fn) instead")


def _graphs(block):
    """Every node of a graph or block, nested blocks included."""
    for node in block.nodes():
        yield node
        for b in node.blocks():
            yield from _graphs(b)


def _constant(value):
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def _kernel(name: str, sm) -> tuple[str, dict]:
    """The scripted module's recurrent kernel call: its family and the settings it passes as constants."""
    for method in sm._c._method_names():
        for node in _graphs(getattr(sm, method).graph):
            family = KERNELS.get(node.kind())
            if family and "batch_first" in node.schema():
                ins = list(node.inputs())
                batch_first, dropout = _constant(ins[BATCH_FIRST]), _constant(ins[DROPOUT])
                if batch_first is None:
                    raise RnnscopeError(f"the archive's recurrent module {name!r} does not fix batch_first as a "
                                        "constant", "script the model from an nn.Module whose RNNs are standard")
                extra = {"nonlinearity": "relu" if node.kind() == "aten::rnn_relu" else "tanh"} if family == "RNN" else {}
                return family, {"batch_first": bool(batch_first), "dropout": float(dropout or 0.0), **extra}
    raise RnnscopeError(f"the archive's module {name!r} ({sm.original_name}) calls no recurrent kernel",
                        "script or trace the model from standard nn.RNN / nn.LSTM / nn.GRU modules")


def rebuild(name: str, sm) -> nn.Module:
    """An eager ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` equal to the scripted module ``sm``."""
    family, settings = _kernel(name, sm)
    params = {k: v.detach() for k, v in sm.named_parameters()}
    if "weight_ih_l0" not in params:
        raise RnnscopeError(f"the archive's recurrent module {name!r} has no weight_ih_l0",
                            "script the model from standard nn.RNN / nn.LSTM / nn.GRU modules")
    hidden = params["weight_hh_l0"].shape[0] // GATES[family]
    proj = params["weight_hr_l0"].shape[0] if "weight_hr_l0" in params else 0
    layers = sum(1 for k in params if k.startswith("weight_ih_l") and not k.endswith("_reverse"))
    kwargs = dict(num_layers=layers, bias="bias_ih_l0" in params, bidirectional="weight_ih_l0_reverse" in params,
                  **settings, **({"proj_size": proj} if proj else {}))
    m = RECURRENT[family](params["weight_ih_l0"].shape[1], hidden, **kwargs)
    try:
        m.load_state_dict(params, strict=True)
    except RuntimeError as err:
        raise RnnscopeError(f"the archive's recurrent module {name!r} cannot be rebuilt as nn.{family} "
                            f"({first_line(err, 120)})", "script the model from standard modules") from None
    return m.eval()


def eager(archive: torch.jit.ScriptModule, where: str = "") -> nn.Module:
    """What a Probe can record in place of ``archive``: the module itself rebuilt when the archive is
    one scripted RNN / LSTM / GRU, else a ``Replayed`` model."""
    if getattr(archive, "original_name", None) in RECURRENT:
        return rebuild("", archive)
    archive_ops.check(archive, where or f"({archive.original_name})")
    return Replayed(archive).eval()


class Replayed(nn.Module):
    """An eager stand-in for a TorchScript archive: the rebuilt recurrent modules sit at the archive's
    own qualified names (so state keys read ``rnn.l0.h`` as for the eager model) and ``forward``
    replays the archive's graph. The archive itself is kept out of ``state_dict`` (its weights are
    the rebuilt ones plus those it runs compiled, which ``model_checksum`` reads from the archive)."""

    def __init__(self, archive: torch.jit.ScriptModule):
        super().__init__()
        object.__setattr__(self, "archive", archive)
        self._eager: dict[int, nn.Module] = {}
        holding: set[int] = set()
        named = dict(archive.named_modules())
        for name, sm in named.items():
            if getattr(sm, "original_name", None) in RECURRENT:
                m = rebuild(name, sm)
                self._eager[id(sm)] = m
                self._attach(name, m)
                parts = name.split(".")
                for i in range(len(parts)):          # every module on the way down holds a recurrent one
                    holding.add(id(named[".".join(parts[:i])]))
        if not self._eager:
            raise RnnscopeError("the TorchScript archive holds no nn.RNN / nn.LSTM / nn.GRU module",
                                "rnnscope records recurrent modules: script a model that has one")
        self._holding, self._shapes = holding, {}

    def _attach(self, name: str, m: nn.Module) -> None:
        *path, last = name.split(".")
        parent = self
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(last, m)

    def train(self, mode: bool = True):
        self.archive.train(mode)
        return super().train(mode)

    def state_dict(self, *args, **kwargs):
        return self.archive.state_dict(*args, **kwargs)

    def forward(self, *args):
        replay = _Replay(self._eager, self._holding, self._shapes, archive_ops.budget(args))
        return replay.graph(self.archive.graph, [self.archive, *args])


def _function_graph(call):
    """A graph holding only this ``prim::CallFunction``, inlined: the called function's own body (a
    function has no ``self``, so no recurrent module runs inside it)."""
    g = torch._C.Graph()
    args = []
    for v in list(call.inputs())[1:]:
        a = g.addInput()
        a.setType(v.type())
        args.append(a)
    fn = g.create("prim::Constant")
    fn.copyAttributes(call.inputsAt(0).node())
    fn.output().setType(call.inputsAt(0).type())
    g.insertNode(fn)
    node = g.insertNode(g.create("prim::CallFunction", [fn.output(), *args], call.outputsSize()))
    for mine, theirs in zip(node.outputs(), call.outputs()):
        mine.setType(theirs.type())
        g.registerOutput(mine)
    torch._C._jit_pass_inline(g)
    return g


def _returned(graph):
    """What a traced recurrent module's forward returns, in terms of its kernel's outputs (a trace
    keeps only what the caller used: ``0`` for the output alone, ``(0, (1, 2))``...); ``None`` when
    it returns anything else (a scripted forward: the eager module's own return)."""
    def of(v):
        n = v.node()
        if n.kind() in KERNELS:
            return [o.unique() for o in n.outputs()].index(v.unique())
        if n.kind() == "prim::TupleConstruct":
            return tuple(of(i) for i in n.inputs())
        raise LookupError
    try:
        return of(next(graph.outputs()))
    except LookupError:
        return None


def _fill(shape, flat: list):
    return flat[shape] if isinstance(shape, int) else tuple(_fill(s, flat) for s in shape)


# prim operators with a plain Python meaning
SIMPLE = {"prim::device": lambda t: t.device, "prim::dtype": lambda t: t.dtype, "prim::NumToTensor": torch.scalar_tensor,
          "prim::min": lambda *a: min(*a), "prim::max": lambda *a: max(*a), "prim::shape": lambda t: list(t.shape),
          "prim::DictConstruct": lambda *a: dict(zip(a[::2], a[1::2]))}


class _Replay:
    """Runs a TorchScript graph node by node (see the module docstring)."""

    def __init__(self, eager: dict[int, nn.Module], holding: set[int], shapes: dict, budget: int):
        self.eager, self.holding, self.shapes = eager, holding, shapes     # shapes: kept between calls
        self.left = budget                                                 # nodes this call may still run

    def graph(self, graph, args: list):
        """The graph's result (TorchScript graphs return one value; a tuple is built inside)."""
        env = {v.unique(): a for v, a in zip(graph.inputs(), args)}
        out = self.block(graph, env)
        return out[0] if len(out) == 1 else tuple(out)

    def block(self, block, env: dict) -> list:
        for node in block.nodes():
            self.left -= 1
            if self.left < 0:
                raise RnnscopeError("the TorchScript model ran past its step budget "
                                    f"({archive_ops.STEPS_PER_ELEMENT:,} nodes per input element): a loop that "
                                    "does not end", "record the eager model through a spec file (file.py:fn)")
            outs = list(node.outputs())
            result = self.node(node, [env[v.unique()] for v in node.inputs()], env)
            if node.kind() in ("prim::If", "prim::Loop"):        # a block's outputs: already a list
                values = result
            else:
                values = [result] if len(outs) == 1 else list(result if result is not None else [])
            for v, r in zip(outs, values):
                env[v.unique()] = r
        return [env[v.unique()] for v in block.outputs()]

    def node(self, node, ins: list, env: dict):
        kind = node.kind()
        if kind == "prim::Constant":          # a function constant is only the callee of a prim::CallFunction
            return None if node.output().type().kind() == "FunctionType" else node.output().toIValue()
        if kind == "prim::CallFunction":
            return self.graph(_function_graph(node), ins[1:])
        if kind == "prim::GetAttr":
            return getattr(ins[0], node.s("name"))
        if kind == "prim::CallMethod":
            return self.call(ins[0], node.s("name"), ins[1:])
        if kind in ("prim::TupleConstruct", "prim::ListConstruct"):
            return tuple(ins) if kind == "prim::TupleConstruct" else list(ins)
        if kind in ("prim::TupleUnpack", "prim::ListUnpack"):
            return list(ins[0])
        if kind in ("prim::TupleIndex", "aten::__getitem__"):
            return ins[0][ins[1]]
        if kind in SIMPLE:
            return SIMPLE[kind](*ins)
        if kind in ("prim::unchecked_cast", "prim::Uninitialized"):
            return ins[0] if ins else None
        if kind in ("aten::__is__", "aten::__isnot__"):
            return (ins[0] is ins[1]) == (kind == "aten::__is__")
        if kind == "prim::If":
            return self.block(list(node.blocks())[0 if ins[0] else 1], env)
        if kind == "prim::Loop":
            return self.loop(node, ins, env)
        if kind == "prim::RaiseException":
            raise RnnscopeError(f"the TorchScript model raised: {str(ins[0])[:160]}", "check the model's input")
        if kind.startswith("aten::"):
            return self.aten(node, ins)
        raise RnnscopeError(f"the TorchScript archive uses {kind}, which rnnscope cannot replay",
                            "record the eager model through a spec function instead (file.py:fn)")

    def call(self, obj, method: str, args: list):
        if id(obj) in self.eager:                           # the rebuilt module: a Probe may have patched it
            out, state = self.eager[id(obj)](*args)
            if (id(obj), method) not in self.shapes:
                self.shapes[id(obj), method] = _returned(getattr(obj, method).graph)
            shape = self.shapes[id(obj), method]
            if shape is None:                               # scripted: the module's own return, as eager
                return out, state
            flat = [out, *(state if isinstance(state, tuple) else (state,))]    # the kernel's outputs
            return _fill(shape, flat)
        if ("loops", id(obj), method) not in self.shapes:
            inlined = getattr(obj, method).inlined_graph
            self.shapes["loops", id(obj), method] = any(n.kind() == "prim::Loop" for n in _graphs(inlined))
        if id(obj) in self.holding or self.shapes["loops", id(obj), method]:
            return self.graph(getattr(obj, method).graph, [obj, *args])     # replayed: under the step budget
        return getattr(obj, method)(*args)                 # no recurrent module or loop inside: run it compiled

    def loop(self, node, ins: list, env: dict) -> list:
        trips, go, carried = ins[0], ins[1], ins[2:]
        body = list(node.blocks())[0]
        i = 0
        while go and i < trips:
            env.update({v.unique(): a for v, a in zip(body.inputs(), [i, *carried])})
            go, *carried = self.block(body, env)
            i += 1
        return carried

    @staticmethod
    def aten(node, ins: list):
        op, kwarg_only = _overload(node.schema())
        args, kwargs = [], {}
        for name, v in zip(kwarg_only, ins):
            if name:
                kwargs[name] = v
            else:
                args.append(v)
        return op(*args, **kwargs)


@functools.lru_cache(maxsize=4096)
def _overload(schema: str):
    """The ``torch.ops`` overload a node's schema names, and each argument's name if it is keyword-only
    (parsing a schema costs more than most ops: a replayed loop runs the same few nodes many times)."""
    parsed = torch._C.parse_schema(schema)
    op = getattr(getattr(torch.ops.aten, parsed.name.split("::")[1]), parsed.overload_name or "default")
    return op, tuple(a.name if a.kwarg_only else "" for a in parsed.arguments)
