"""Running a custom loss: a checked `LossGraph` (tinkerd/loss_graph.py) bound to callables.

`compile_loss` checks the graph data again (the engine trusts no LossGraph it did not check)
and binds each node to a callable from the tables here, built from the allowlist's names and
nothing else. `CompiledLoss` evaluates one datum: graph(logprobs, *inputs) → (loss, metrics).

At run time every node's result is bounded in elements, relative to the datum's own inputs,
and its size is worked out on shape-only "meta" tensors before anything is allocated; Python
integers stay within int64 and Python operators take numbers and tensors only (a tuple times
2**40 is a memory bomb). A graph cannot make the engine allocate or compute without bound.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tinkerd.loss_graph import (
    COPYING_FACTORIES,
    FACTORIES,
    FUNCTIONAL,
    GETATTR_TARGETS,
    MATH,
    MAX_INT,
    METHODS,
    OPERATORS,
    TORCH_FUNCTIONS,
    CustomLossError,
    LossGraph,
    Node,
    Ref,
    Seq,
    Slice,
    Special,
    check_loss,
    function_name,
)

# A node's result may hold at most this many elements per element of the datum's logprobs and
# inputs, and never less than MIN_NODE_ELEMENTS: elementwise work, reductions, stacking a few
# per-token terms all fit; an outer product of two per-token vectors ([T, T]) does not.
NODE_ELEMENT_FACTOR = 8
MIN_NODE_ELEMENTS = 1 << 16
MAX_INT_EXPONENT = 64  # `a ** b` and `a << b` on Python integers

# The allowlist's names bound to callables. Only names of the allowlist are looked up, each in
# the module it names; a name this torch lacks is left out (and the graph refused when it runs).
_CALLABLES: dict[str, Callable] = {
    **{f"torch.{name}": getattr(torch, name) for name in TORCH_FUNCTIONS if hasattr(torch, name)},
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in FUNCTIONAL if hasattr(F, name)},
    **{f"operator.{name}": getattr(operator, name) for name in OPERATORS},
    **{f"math.{name}": getattr(math, name) for name in MATH},
}
_METHODS: dict[str, Callable] = {name: getattr(torch.Tensor, name) for name in METHODS if hasattr(torch.Tensor, name)}
_DTYPES = {name: getattr(torch, name) for name in
           ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_CONSTANTS: dict[str, dict[str, Any]] = {
    "float": {"inf": math.inf, "-inf": -math.inf, "nan": math.nan},
    "dtype": _DTYPES,
    "layout": {"strided": torch.strided},
    "memory_format": {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format},
}


def _refuse(loss: str, node: str, message: str) -> CustomLossError:
    return CustomLossError(f"custom loss {loss!r}, node {node!r}: {message}")


@dataclass(frozen=True)
class DatumLoss:
    loss: torch.Tensor  # 0-d
    metrics: dict[str, float]  # "loss:sum" and the loss's own custom/... keys


class CompiledLoss:
    """A `LossGraph` bound to allowlisted callables; calling it evaluates one datum."""

    def __init__(self, graph: LossGraph):
        check_loss(graph)
        self.graph = graph
        self.ranks = dict(graph.inputs)
        self._steps: list[tuple[Node, Callable, str]] = []  # (node, callable, kind)
        for node in graph.nodes[len(graph.inputs):-1]:
            if node.op == "call_method":
                fn, kind = _METHODS.get(node.target), "method"
            elif node.target in GETATTR_TARGETS:
                fn, kind = getattr, "getattr"
            else:
                name = function_name(node.target)
                fn = _CALLABLES.get(name)
                kind = ("operator" if name.startswith("operator.") else "math" if name.startswith("math.")
                        else "copying_factory" if name in COPYING_FACTORIES else "factory" if name in FACTORIES
                        else "function")
            if fn is None:
                raise _refuse(graph.name, node.name, f"{node.target!r} is not available in this server's torch")
            self._steps.append((node, fn, kind))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.graph.inputs[1:])

    def check_datum(self, inputs: Mapping[str, torch.Tensor], n_tokens: int) -> None:
        """A datum's targets and inputs against the loss's declared ranks, then one run on zero
        logprobs without gradient: every error a datum can cause (a missing input, shapes that
        do not fit, a size past the bound, a non-scalar loss) is raised here, before any pass."""
        loss = self.graph.name
        targets = inputs.get("target_tokens")
        if targets is None:
            raise CustomLossError("loss_fn_inputs['target_tokens'] is missing")
        rank = self.ranks["logprobs"]
        if targets.is_floating_point() or targets.dim() != rank or targets.shape[0] != n_tokens:
            raise CustomLossError(
                f"custom loss {loss!r} takes logprobs of rank {rank}: target_tokens must be integers of that rank "
                f"with {n_tokens} rows (one per model_input token), got shape {tuple(targets.shape)}")
        for name in self.input_names:
            if name not in inputs:
                raise CustomLossError(f"custom loss {loss!r} reads loss_fn_inputs[{name!r}], which is missing")
            _shaped(loss, name, inputs[name], self.ranks[name])
        with torch.no_grad():
            self(torch.zeros(targets.shape, dtype=torch.float32, device=targets.device), inputs)

    def __call__(self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> DatumLoss:
        loss = self.graph.name
        values: dict[str, Any] = {"logprobs": logprobs}
        for name in self.input_names:
            values[name] = _shaped(loss, name, inputs[name], self.ranks[name])
        bound = max(MIN_NODE_ELEMENTS, NODE_ELEMENT_FACTOR * sum(v.numel() for v in values.values()))
        device = logprobs.device
        for node, fn, kind in self._steps:
            args = tuple(_value(a, values, device) for a in node.args)
            kwargs = {k: _value(v, values, device) for k, v in node.kwargs}
            values[node.name] = _run(loss, node, fn, kind, args, kwargs, bound, device)
        result = values[self.graph.loss.name]
        if not isinstance(result, torch.Tensor) or result.dim() != 0 or not result.is_floating_point():
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise CustomLossError(f"custom loss {loss!r} must return a scalar float loss, got {shape}")
        metrics = {"loss:sum": float(result.detach())}
        for key, ref in self.graph.metrics:
            value = values[ref.name]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise CustomLossError(f"custom loss {loss!r} metric {key!r} must be a one-element tensor, got {shape}")
            metrics[key] = float(value.detach().float())
        return DatumLoss(result, metrics)


def compile_loss(graph: Any) -> CompiledLoss:
    if not isinstance(graph, LossGraph):
        raise CustomLossError("loss_fn 'custom' needs a loss created with ServiceClient.create_custom_loss")
    return CompiledLoss(graph)


def _shaped(loss: str, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """`tensor` at its declared rank. A rank-0 input arrives as one value without a shape (the
    wire cannot tell [] from no shape)."""
    if rank == 0 and tensor.numel() == 1 and tensor.dim() <= 1:
        return tensor.reshape(())
    if tensor.dim() != rank:
        raise CustomLossError(f"custom loss {loss!r} declared {name} with rank {rank}, but "
                              f"loss_fn_inputs[{name!r}] has shape {tuple(tensor.shape)}")
    return tensor


def _value(arg: Any, values: dict[str, Any], device: torch.device) -> Any:
    if isinstance(arg, Ref):
        return values[arg.name]
    if isinstance(arg, Seq):
        if arg.kind == "dict":
            return {k: _value(v, values, device) for k, v in arg.items}
        items = [_value(a, values, device) for a in arg.items]
        return items if arg.kind == "list" else tuple(items)
    if isinstance(arg, Slice):
        return slice(_value(arg.start, values, device), _value(arg.stop, values, device), _value(arg.step, values, device))
    if isinstance(arg, Special):
        if arg.kind == "ellipsis":
            return Ellipsis
        if arg.kind == "device":
            return device  # whatever device a graph names, it runs on the engine's
        return _CONSTANTS[arg.kind][arg.value]
    return arg


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _run(loss: str, node: Node, fn: Callable, kind: str, args: tuple, kwargs: dict, bound: int,
         device: torch.device) -> Any:
    if kind in ("method", "getattr") and not isinstance(args[0], torch.Tensor):
        raise _refuse(loss, node.name, f"{node.target} is applied to a {type(args[0]).__name__}, not a tensor")
    if kind == "operator":
        _check_operator_args(loss, node, args)
    if kind == "math" and not all(_is_number(a) for a in args):
        raise _refuse(loss, node.name, f"{node.target} takes Python numbers")
    if kind == "factory" and _tensors((args, kwargs)):
        # A size or range read from a tensor's value could not be bounded on meta tensors.
        raise _refuse(loss, node.name, f"{node.target} takes its sizes as Python numbers, not tensors")
    if kind in ("factory", "copying_factory") or "device" in kwargs:
        kwargs["device"] = device
    if kind not in ("getattr", "math") and not (kind == "operator" and not _tensors(args)):
        if kind in ("factory", "copying_factory") or node.target in _SIZED_ON_META:
            _check_size_before(loss, node, fn, args, kwargs, bound)
        else:
            _check_broadcast_size(loss, node, args, kwargs, bound)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - torch's shape and type errors are the user's
        raise _refuse(loss, node.name, f"{node.target} failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    _check_result(loss, node, result, bound)
    return result


def _check_operator_args(loss: str, node: Node, args: tuple) -> None:
    """Python operators take tensors and numbers; only indexing takes a sequence (`*` would
    repeat one)."""
    if node.target == "operator.getitem":
        if not isinstance(args[0], (torch.Tensor, tuple, list)):
            raise _refuse(loss, node.name, f"indexes a {type(args[0]).__name__}")
        return
    for a in args:
        if not (isinstance(a, torch.Tensor) or _is_number(a)):
            raise _refuse(loss, node.name, f"{node.target} on a {type(a).__name__}; operators take tensors and numbers")
    if node.target in ("operator.pow", "operator.lshift") and len(args) == 2 and all(type(a) is int for a in args) \
            and abs(args[1]) > MAX_INT_EXPONENT:
        raise _refuse(loss, node.name, f"integer exponent {args[1]} is more than {MAX_INT_EXPONENT}")


# Operations whose result may hold more elements than their tensor arguments broadcast
# together: indexing with index tensors, joining lists, selecting by index, expanding. Their size
# is worked out on meta tensors (about a millisecond: meta kernels are Python); every other
# allowlisted operation is elementwise, a reduction or a reshape, whose result is no larger than
# its arguments broadcast (growth beyond that is at most linear, and the check after the call
# catches it).
_SIZED_ON_META = frozenset({"operator.getitem", "torch.stack", "torch.cat", "torch.concat", "torch.index_select",
                            "index_select", "expand", "expand_as", "torch.diff", "diff"})


def _check_broadcast_size(loss: str, node: Node, args: tuple, kwargs: dict, bound: int) -> None:
    tensors = _tensors((args, kwargs))
    try:
        estimate = math.prod(torch.broadcast_shapes(*(t.shape for t in tensors))) if tensors else 0
    except RuntimeError:  # shapes that do not broadcast: the call fails, or does not broadcast
        estimate = max(t.numel() for t in tensors)
    if estimate > bound:
        raise _refuse(loss, node.name, f"its result would hold {estimate} elements, more than this datum's bound "
                                       f"of {bound} ({NODE_ELEMENT_FACTOR} per element of its logprobs and inputs)")


def _check_size_before(loss: str, node: Node, fn: Callable, args: tuple, kwargs: dict, bound: int) -> None:
    """The result's size, worked out on shape-only tensors, so nothing past the bound is
    allocated. What meta tensors cannot run (an output size that depends on values, as in
    boolean indexing) is no larger than its inputs."""
    try:
        estimate = sum(t.numel() for t in _tensors(fn(*_to_meta(args), **_to_meta(kwargs))))
    except Exception:  # noqa: BLE001 - see above; a genuine error shows when it runs for real
        estimate = sum(t.numel() for t in _tensors(args))
    if estimate > bound:
        raise _refuse(loss, node.name, f"its result would hold {estimate} elements, more than this datum's bound "
                                       f"of {bound} ({NODE_ELEMENT_FACTOR} per element of its logprobs and inputs)")


_RESULT_TYPES = (torch.Tensor, torch.Size, torch.dtype, torch.device, bool, int, float, tuple, list)


def _check_result(loss: str, node: Node, result: Any, bound: int) -> None:
    size = sum(t.numel() for t in _tensors(result))
    if size > bound:
        raise _refuse(loss, node.name, f"its result holds {size} elements, more than this datum's bound of {bound}")
    if type(result) is int and abs(result) >= MAX_INT:
        raise _refuse(loss, node.name, "an integer result outside int64")
    if not (result is None or isinstance(result, _RESULT_TYPES)):
        raise _refuse(loss, node.name, f"returned a {type(result).__name__}, which a custom loss cannot use")
    if isinstance(result, (tuple, list)) and not isinstance(result, torch.Size):
        for item in result:
            if not (item is None or isinstance(item, (torch.Tensor, bool, int, float))):
                raise _refuse(loss, node.name, f"returned a {type(item).__name__} inside a sequence")
