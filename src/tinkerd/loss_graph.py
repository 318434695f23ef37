"""Custom losses as checked data: the graph `create_custom_loss` uploads, and the allowlist it
is checked against.

`ServiceClient.create_custom_loss` uploads a loss traced with torch.fx as JSON nodes
(docs/wire-protocol.md "Custom losses"). `parse_loss` turns that JSON into a `LossGraph`,
refusing at creation, with the offending node's name, anything whose operation is not named
in the tables below. A `LossGraph` is plain frozen data: it travels with a forward_backward
call to the engine (through Ray too), where `tinkerd.engine.custom_loss` checks it again with
`check_loss` and binds each name to a callable of its own table. Nothing of a graph is ever
run as Python: no eval, no import of a name taken from it.

No torch here: the front doors and the core check graphs without loading it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tinkerd.types import UserError

# -- limits ------------------------------------------------------------------------------------

MAX_NODES = 2000  # a traced loss of a few dozen lines has ~100
MAX_INPUTS = 16  # logprobs included, as the SDK enforces
MAX_ARG_DEPTH = 8  # nesting of tuples/lists/dicts in one argument
MAX_INT = 2**63  # Python integers in the graph and in its results stay within int64

_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_OPS = ("placeholder", "call_function", "call_method", "output")


class CustomLossError(UserError):
    """A custom loss the server refuses, or one that failed on a datum; the message names the node."""


# -- the allowlist -----------------------------------------------------------------------------
# Deliberately absent everywhere: anything in place (a trailing `_`, `out=`, `inplace=True`,
# operator.iadd/setitem: they would write into logprobs the whole batch shares), anything that
# reads uninitialised memory (empty, new_empty: another request's data), products whose result
# outgrows their inputs before a bound can be checked (matmul, outer, einsum, kron,
# cartesian_prod, one_hot, diag_embed, pad, repeat, tile), and anything that leaves torch
# (item, tolist, numpy) or touches autograd (backward, register_hook, requires_grad_, grad).

# Elementwise math, comparisons, reductions and reshapes: torch functions and tensor methods both.
TENSOR_OPS = frozenset({
    "abs", "neg", "exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "square", "pow",
    "reciprocal", "sigmoid", "tanh", "sign", "floor", "ceil", "round", "trunc",
    "clamp", "clip", "clamp_min", "clamp_max", "minimum", "maximum", "where", "nan_to_num",
    "add", "sub", "mul", "div", "true_divide", "remainder",
    "lt", "le", "gt", "ge", "eq", "ne", "isfinite", "isnan", "isinf",
    "logical_and", "logical_or", "logical_not", "logical_xor",
    "sum", "nansum", "mean", "nanmean", "prod", "amax", "amin", "max", "min", "argmax", "argmin",
    "logsumexp", "softmax", "log_softmax", "cumsum", "std", "var", "norm", "dot", "count_nonzero",
    "any", "all", "sort", "topk",
    "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "flip", "narrow",
    "select", "index_select", "gather", "masked_fill", "diff", "detach",
})
TORCH_FUNCTIONS = TENSOR_OPS | {
    "exp2", "float_power", "erf", "fmin", "fmax", "stack", "cat", "concat",
    "zeros_like", "ones_like", "full_like", "zeros", "ones", "full", "arange", "tensor", "as_tensor",
    "scalar_tensor",
}
FUNCTIONAL = frozenset({
    "logsigmoid", "softplus", "relu", "sigmoid", "silu", "softmax", "log_softmax", "kl_div", "mse_loss",
    "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits", "normalize",
})
# Functions that make a tensor from Python values (they run on the engine's device), and those
# of them that copy what they are given, so that their result is no larger than it.
FACTORIES = frozenset({"torch.zeros", "torch.ones", "torch.full", "torch.arange", "torch.tensor", "torch.as_tensor",
                       "torch.scalar_tensor"})
COPYING_FACTORIES = frozenset({"torch.tensor", "torch.as_tensor", "torch.scalar_tensor"})
# Python's operators as fx records them (x + y, x[i], x > 0, -x).
OPERATORS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "invert",
    "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "lshift", "rshift", "getitem",
})
# math functions fx records when a loss applies them to a Python number (e.g. a length).
MATH = frozenset({"log", "log1p", "log2", "log10", "exp", "sqrt", "floor", "ceil", "fabs", "tanh", "isfinite"})
GETATTR_TARGETS = frozenset({"getattr", "builtins.getattr"})
# The only attributes `getattr` may read, and only of a tensor.
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "T", "mT", "device"})
# torch.Tensor methods a loss may call, on a tensor.
METHODS = TENSOR_OPS | {
    "view", "view_as", "permute", "t", "expand", "expand_as",
    "contiguous", "clone", "float", "double", "long", "int", "bool", "to", "type_as",
    "size", "dim", "numel",
}
# The names fx records for some of the functions above, and the public name each stands for.
FX_NAMES = {
    "torch._C._nn.log_sigmoid": "torch.nn.functional.logsigmoid",
    "torch._C._nn.softplus": "torch.nn.functional.softplus",
    "torch.functional.norm": "torch.norm",
}
FUNCTIONS = frozenset({
    *(f"torch.{name}" for name in TORCH_FUNCTIONS),
    *(f"torch.nn.functional.{name}" for name in FUNCTIONAL),
    *(f"operator.{name}" for name in OPERATORS),
    *(f"math.{name}" for name in MATH),
})
# Constants a graph may spell as {"dtype": ...} and friends.
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"})
LAYOUTS = frozenset({"strided"})
MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format"})
FLOATS = frozenset({"inf", "-inf", "nan"})


def function_name(target: str) -> str:
    """The public name of a call_function target (fx may record a private one)."""
    return FX_NAMES.get(target, target)


# -- the graph as plain data -------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An earlier node's value."""

    name: str


@dataclass(frozen=True)
class Seq:
    """A Python list, tuple (`x[[0, 1]]` and `x[0, 1]` differ) or dict of arguments."""

    kind: str  # "list" | "tuple" | "dict" (items are then (key, value) pairs)
    items: tuple


@dataclass(frozen=True)
class Slice:
    start: Any
    stop: Any
    step: Any


@dataclass(frozen=True)
class Special:
    """A constant JSON cannot spell: ellipsis, ±inf/nan, a dtype, device, layout or memory format."""

    kind: str
    value: str


@dataclass(frozen=True)
class Node:
    op: str
    name: str
    target: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class LossGraph:
    """A checked custom loss: what `compile_loss` rebuilds. Plain data, picklable."""

    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank): logprobs first, then loss_fn_inputs keys
    nodes: tuple[Node, ...]  # placeholders first, the output node last
    loss: Ref
    metrics: tuple[tuple[str, Ref], ...]


# -- parsing and checking (at creation, and again before running) ------------------------------


def _refuse(loss: str, node: str | None, message: str) -> CustomLossError:
    where = f"custom loss {loss!r}" + (f", node {node!r}" if node else "")
    return CustomLossError(f"{where}: {message}")


def parse_loss(name: Any, inputs: Any, graph: Any) -> LossGraph:
    """The JSON of a create_custom_loss request as a checked `LossGraph`; CustomLossError
    naming the offending node (or field) otherwise."""
    if not isinstance(name, str) or not name or len(name) > 128:
        raise CustomLossError("custom loss name must be a string of 1 to 128 characters")
    if not isinstance(inputs, list):
        raise _refuse(name, None, "inputs must be a list of {name, rank}")
    parsed_inputs = []
    for i, item in enumerate(inputs):
        if not (isinstance(item, dict) and set(item) <= {"name", "rank"} and isinstance(item.get("name"), str)
                and type(item.get("rank")) is int):
            raise _refuse(name, None, f"inputs[{i}] must be {{name: str, rank: 0 | 1 | 2}}")
        parsed_inputs.append((item["name"], item["rank"]))
    if not isinstance(graph, dict) or graph.get("format", 1) != 1 or not isinstance(graph.get("nodes"), list):
        raise _refuse(name, None, "graph must be {format: 1, nodes: [...]}")
    if len(graph["nodes"]) > MAX_NODES:
        raise _refuse(name, None, f"graph has {len(graph['nodes'])} nodes, more than {MAX_NODES}")
    nodes = tuple(_parse_node(name, i, raw) for i, raw in enumerate(graph["nodes"]))
    output = nodes[-1] if nodes else None
    if output is None or output.op != "output":
        raise _refuse(name, None, "the graph's last node must be its output")
    loss, metrics = _parse_output(name, output)
    result = LossGraph(name, tuple(parsed_inputs), nodes, loss, metrics)
    check_loss(result)
    return result


def _parse_node(loss: str, index: int, raw: Any) -> Node:
    if not isinstance(raw, dict):
        raise _refuse(loss, None, f"nodes[{index}] is not an object")
    node_name = raw.get("name")
    if not isinstance(node_name, str) or not _NODE_NAME.fullmatch(node_name):
        raise _refuse(loss, None, f"nodes[{index}] has no valid name (letters, digits and _)")
    op, target = raw.get("op"), raw.get("target")
    if not isinstance(op, str) or not isinstance(target, str):
        raise _refuse(loss, node_name, "op and target must be strings")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise _refuse(loss, node_name, "args must be a list and kwargs an object")
    return Node(op, node_name, target, tuple(_parse_arg(loss, node_name, a, 0) for a in args),
                tuple((str(k), _parse_arg(loss, node_name, v, 0)) for k, v in kwargs.items()))


def _parse_arg(loss: str, node: str, arg: Any, depth: int) -> Any:
    if depth > MAX_ARG_DEPTH:
        raise _refuse(loss, node, f"an argument is nested more than {MAX_ARG_DEPTH} deep")
    if arg is None or isinstance(arg, (bool, str)):
        return arg
    if isinstance(arg, int):
        if abs(arg) >= MAX_INT:
            raise _refuse(loss, node, f"integer {arg} is outside int64")
        return arg
    if isinstance(arg, float):
        return arg
    if isinstance(arg, list):
        return Seq("list", tuple(_parse_arg(loss, node, a, depth + 1) for a in arg))
    if not (isinstance(arg, dict) and len(arg) == 1):
        raise _refuse(loss, node, f"argument {str(arg)[:80]!r} is not a value this server reads")
    (kind, value), = arg.items()
    if kind == "ref" and isinstance(value, str):
        return Ref(value)
    if kind == "tuple" and isinstance(value, list):
        return Seq("tuple", tuple(_parse_arg(loss, node, a, depth + 1) for a in value))
    if kind == "dict" and isinstance(value, dict):
        return Seq("dict", tuple((str(k), _parse_arg(loss, node, v, depth + 1)) for k, v in value.items()))
    if kind == "slice" and isinstance(value, list) and len(value) == 3:
        parts = [_parse_arg(loss, node, a, depth + 1) for a in value]
        return Slice(*parts)
    if kind == "ellipsis" and value is True:
        return Special("ellipsis", "")
    tables = {"float": FLOATS, "dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
    if kind in tables and isinstance(value, str) and value in tables[kind]:
        return Special(kind, value)
    if kind == "device" and isinstance(value, str):
        return Special("device", value)  # whatever it names, the loss runs on the engine's device
    raise _refuse(loss, node, f"argument {str(arg)[:80]!r} is not a value this server reads")


def _parse_output(loss: str, output: Node) -> tuple[Ref, tuple[tuple[str, Ref], ...]]:
    if len(output.args) != 1 or not isinstance(output.args[0], Seq) or len(output.args[0].items) != 2 \
            or output.args[0].kind == "dict":
        raise _refuse(loss, output.name, "the loss must return (loss, metrics)")
    value, metrics = output.args[0].items
    if not isinstance(value, Ref):
        raise _refuse(loss, output.name, "the loss must return its loss as a tensor")
    if not (isinstance(metrics, Seq) and metrics.kind == "dict"):
        raise _refuse(loss, output.name, "the loss must return its metrics as a dict")
    for key, metric in metrics.items:
        if not _METRIC_KEY.fullmatch(key):
            raise _refuse(loss, output.name, f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean "
                                             "(lowercase letters, digits and _./-)")
        if not isinstance(metric, Ref):
            raise _refuse(loss, output.name, f"metric {key!r} must be a tensor")
    return value, metrics.items


def check_loss(graph: LossGraph) -> None:
    """Everything `parse_loss` checks, on the data itself: the engine runs this before it
    trusts a LossGraph, however it was made."""
    loss = graph.name
    names = [n for n, _ in graph.inputs]
    if not names or names[0] != "logprobs":
        raise _refuse(loss, None, "its first input must be logprobs")
    if len(names) > MAX_INPUTS:
        raise _refuse(loss, None, f"it takes {len(names)} inputs; at most {MAX_INPUTS}, logprobs included")
    if len(set(names)) != len(names):
        raise _refuse(loss, None, "two inputs have the same name")
    for input_name, rank in graph.inputs:
        if not _INPUT_NAME.fullmatch(input_name):
            raise _refuse(loss, None, f"input {input_name!r} must be a lowercase name of letters, digits and _")
        if rank not in (0, 1, 2):
            raise _refuse(loss, None, f"input {input_name!r} has rank {rank}; ranks are 0, 1 or 2")
    if graph.inputs[0][1] == 0:
        raise _refuse(loss, None, "logprobs has rank 1 ([T]) or 2 ([T, K])")
    if len(graph.nodes) > MAX_NODES:
        raise _refuse(loss, None, f"graph has {len(graph.nodes)} nodes, more than {MAX_NODES}")
    defined: set[str] = set()
    for index, node in enumerate(graph.nodes):
        _check_node(graph, index, node, defined)
        defined.add(node.name)
    if not graph.nodes or graph.nodes[-1].op != "output":
        raise _refuse(loss, None, "the graph's last node must be its output")
    for ref in (graph.loss, *(r for _, r in graph.metrics)):
        if ref.name not in defined or ref.name in names:
            raise _refuse(loss, graph.nodes[-1].name, f"returns {ref.name!r}, which is not a computed value")


def _check_node(graph: LossGraph, index: int, node: Node, defined: set[str]) -> None:
    loss = graph.name
    if node.op not in _OPS:
        why = {"call_module": "calls a module; custom losses may use functions (torch.nn.functional), not modules",
               "get_attr": "reads an attribute of the traced module (a captured tensor); a loss may only read "
                           "logprobs and the inputs it names"}
        raise _refuse(loss, node.name, why.get(node.op, f"op {node.op[:40]!r} is not allowed"))
    if node.name in defined:
        raise _refuse(loss, node.name, "two nodes have this name")
    if node.op == "placeholder":
        expected = graph.inputs[index][0] if index < len(graph.inputs) else None
        if node.target != expected or node.name != expected or node.args or node.kwargs:
            raise _refuse(loss, node.name, "placeholders must be the loss's inputs, in order, before any other node")
        return
    if index < len(graph.inputs):
        raise _refuse(loss, node.name, f"input {graph.inputs[index][0]!r} has no placeholder")
    if node.op == "output":
        if index != len(graph.nodes) - 1:
            raise _refuse(loss, node.name, "the output must be the graph's last node")
        return
    for key, _ in node.kwargs:
        if key == "out":
            raise _refuse(loss, node.name, "out= writes into an existing tensor; custom losses may not")
    if dict(node.kwargs).get("inplace") not in (None, False):
        raise _refuse(loss, node.name, "inplace=True is not allowed")
    for value in (*node.args, *(v for _, v in node.kwargs)):
        _check_value(loss, node.name, value, 0)
    for ref in _refs(node.args) + _refs(node.kwargs):
        if ref not in defined:
            raise _refuse(loss, node.name, f"uses {ref!r} before it is computed (or it does not exist)")
    if node.op == "call_method":
        if node.target not in METHODS:
            raise _refuse(loss, node.name, f"tensor method {node.target[:64]!r} is not in this server's allowlist "
                                           "(docs/wire-protocol.md, custom losses)")
        if not node.args:
            raise _refuse(loss, node.name, "a method call needs the tensor it is called on")
        if node.target == "to" and any(isinstance(a, str) for a in node.args):
            raise _refuse(loss, node.name, "to() with a device name: the loss runs on the server's device")
    elif node.target in GETATTR_TARGETS:
        if len(node.args) != 2 or node.kwargs or node.args[1] not in TENSOR_ATTRIBUTES:
            attr = node.args[1] if len(node.args) == 2 else None
            raise _refuse(loss, node.name, f"getattr may only read {sorted(TENSOR_ATTRIBUTES)} of a tensor, "
                                           f"not {str(attr)[:64]!r}")
    elif function_name(node.target) not in FUNCTIONS:
        raise _refuse(loss, node.name, f"function {node.target[:96]!r} is not in this server's allowlist "
                                       "(docs/wire-protocol.md, custom losses)")
    if isinstance(dict(node.kwargs).get("device"), str):
        raise _refuse(loss, node.name, "device= names a device: the loss runs on the server's device")


_SPECIALS = {"ellipsis": frozenset({""}), "float": FLOATS, "dtype": DTYPES, "layout": LAYOUTS,
             "memory_format": MEMORY_FORMATS}


def _check_value(loss: str, node: str, value: Any, depth: int) -> None:
    """An argument holds only what `_parse_arg` makes."""
    if depth > MAX_ARG_DEPTH:
        raise _refuse(loss, node, f"an argument is nested more than {MAX_ARG_DEPTH} deep")
    if value is None or isinstance(value, (bool, str, float, Ref)):
        return
    if isinstance(value, int):
        if abs(value) >= MAX_INT:
            raise _refuse(loss, node, f"integer {value} is outside int64")
        return
    if isinstance(value, Seq) and value.kind in ("list", "tuple"):
        for item in value.items:
            _check_value(loss, node, item, depth + 1)
        return
    if isinstance(value, Seq) and value.kind == "dict":
        for key, item in value.items:
            _check_value(loss, node, key, depth + 1)
            _check_value(loss, node, item, depth + 1)
        return
    if isinstance(value, Slice):
        for item in (value.start, value.stop, value.step):
            _check_value(loss, node, item, depth + 1)
        return
    if isinstance(value, Special) and (value.kind == "device" or value.value in _SPECIALS.get(value.kind, ())):
        return
    raise _refuse(loss, node, f"argument {str(value)[:80]!r} is not a value this server reads")


def _refs(value: Any) -> list[str]:
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, Seq):
        return [r for item in value.items for r in _refs(item)]
    if isinstance(value, Slice):
        return _refs(value.start) + _refs(value.stop) + _refs(value.step)
    if isinstance(value, tuple):
        return [r for item in value for r in _refs(item)]
    return []
