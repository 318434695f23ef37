"""Wire conversions: the SDK's protobuf shapes ⇄ plain values (`tinkerd.types`).

The schema is the SDK's own (`tinker.proto.tinker_public_pb2`); this module only maps it
onto numpy arrays and tinkerd's dataclasses. The shapes: requests in docs/wire-protocol.md §5.3,
`ForwardBackwardOutput` in docs/wire-protocol.md §5.4, `SampleResponse` in docs/wire-protocol.md §6.4.
"""

from __future__ import annotations

import math

import numpy as np

from tinkerd.api.sdk import pb
from tinkerd.types import Datum, SampleResult, TrainResult, UserError


class WireError(UserError):
    """The body does not describe a valid request; the message names the field."""


_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_BFLOAT16 = np.dtype(np.uint16)  # read as raw 16-bit words, widened to float32 below

# A sparse tensor is made dense here, and its dense size is not paid for in body bytes (a
# 111-byte body can name an 8 GB shape). One tensor may hold 16M values (an 8k-token datum
# with 2048 values per token), a request 64M (256 MB of float32) in all.
MAX_TENSOR_ELEMENTS = 1 << 24
MAX_REQUEST_ELEMENTS = 1 << 26


class ElementBudget:
    """Dense values a request's tensors may still take."""

    def __init__(self, total: int = MAX_REQUEST_ELEMENTS):
        self.total = self.left = total

    def take(self, count: int, what: str) -> None:
        if count > MAX_TENSOR_ELEMENTS:
            raise WireError(f"{what}: {count} values is more than {MAX_TENSOR_ELEMENTS} in one tensor")
        if count > self.left:
            raise WireError(f"{what}: the request's tensors hold more than {self.total} values in all")
        self.left -= count


def _words(data: bytes, dtype: np.dtype, what: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise WireError(f"{what}: {len(data)} bytes is not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(data, dtype=dtype)


def _shape(msg: pb.Tensor, what: str) -> list[int]:
    shape = [int(d) for d in msg.shape]
    if any(d < 0 for d in shape):
        raise WireError(f"{what}: negative dimension in shape {shape}")
    return shape


def tensor_to_numpy(msg: pb.Tensor, what: str, budget: ElementBudget | None = None) -> np.ndarray:
    budget = budget or ElementBudget()
    if msg.dtype == pb.DTYPE_BFLOAT16:
        np_dtype = _BFLOAT16
    elif msg.dtype in _NP_DTYPES:
        np_dtype = np.dtype(_NP_DTYPES[msg.dtype])
    else:
        raise WireError(f"{what}: unsupported dtype {msg.dtype}")
    shape = _shape(msg, what)
    if msg.HasField("sparse_csr"):
        arr = _sparse_to_dense(msg.sparse_csr, shape, np_dtype, what, budget)
    else:
        arr = _words(msg.dense, np_dtype, what)
        budget.take(arr.size, what)
        if shape:
            if math.prod(shape) != arr.size:
                raise WireError(f"{what}: {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
    if np_dtype is _BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _sparse_to_dense(csr: pb.SparseCsr, shape: list[int], np_dtype: np.dtype, what: str, budget: ElementBudget) -> np.ndarray:
    if len(shape) != 2:
        raise WireError(f"{what}: a sparse CSR tensor needs a 2-D shape, got {shape}")
    rows, cols = shape
    budget.take(rows * cols, what)  # before the dense array exists
    values = _words(csr.values, np_dtype, what)
    crow = _words(csr.crow_indices, np.dtype(np.int64), what)
    col = _words(csr.col_indices, np.dtype(np.int64), what)
    if (len(crow) != rows + 1 or len(col) != len(values) or crow[0] != 0 or crow[-1] != len(values)
            or np.any(np.diff(crow) < 0) or (len(col) and (col.min() < 0 or col.max() >= cols))):
        raise WireError(f"{what}: inconsistent sparse CSR indices for shape {shape}")
    dense = np.zeros(shape, dtype=np_dtype)  # pad value 0 for loss_fn_inputs
    row_index = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_index, col] = values
    return dense


def chunks_to_tokens(chunks, what: str) -> np.ndarray:
    parts = []
    for chunk in chunks:
        which = chunk.WhichOneof("chunk") if hasattr(chunk, "WhichOneof") else None
        if which != "encoded_text":
            raise WireError(f"{what}: only encoded_text chunks are supported by this model (got {which})")
        parts.append(_words(chunk.encoded_text.tokens, np.dtype(np.int32), f"{what} tokens").astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    return config


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise WireError(f"malformed protobuf ForwardBackwardRequest: {exc}") from None
    if not msg.model_id:
        raise WireError("ForwardBackwardRequest.model_id is missing")
    return msg


def datums_from_proto(msg: pb.ForwardBackwardRequest) -> list[Datum]:
    datums = []
    budget = ElementBudget()
    for i, d in enumerate(msg.data):
        tokens = chunks_to_tokens(d.model_input, f"data[{i}].model_input")
        inputs = {}
        for name, tensor in d.loss_fn_inputs.items():
            arr = tensor_to_numpy(tensor, f"data[{i}].loss_fn_inputs[{name!r}]", budget)
            inputs[name] = arr.astype(np.int64) if name == "target_tokens" else arr.astype(np.float32)
        datum = Datum(tokens=tokens, inputs=inputs)
        if len(d.model_input_spans) or len(d.loss_fn_input_spans):
            datum.model_input_spans = [_span(sp) for sp in d.model_input_spans]
            datum.loss_fn_input_spans = [_span(sp) for sp in d.loss_fn_input_spans]
        datums.append(datum)
    return datums


def _span(msg: pb.ProvenanceSpan) -> tuple[str, str, int, int]:
    which = msg.WhichOneof("span")
    if which == "sampled_tokens":
        arm, kind = msg.sampled_tokens, "sampled"
    elif which == "prompt_tokens":
        arm, kind = msg.prompt_tokens, "prompt"
    else:
        raise WireError(f"provenance span of unknown kind {which!r}")
    return kind, arm.sequence_id, int(arm.offset), int(arm.length)


def _batched(arrays: list[np.ndarray], dtype: int, np_dtype) -> pb.BatchedTensor:
    bt = pb.BatchedTensor()
    bt.dtype = dtype
    flat = [np.ascontiguousarray(a, dtype=np_dtype) for a in arrays]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in flat])
    bt.data = b"".join(a.tobytes() for a in flat)
    bt.offsets = offsets.tobytes()
    trailing = list(arrays[0].shape[1:]) if arrays else []
    bt.trailing_shape.extend(trailing)
    return bt


def forward_backward_output(result: TrainResult) -> bytes:
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    # One ArrayRecord per run of datums whose per-field trailing shapes agree.
    groups: list[list[dict[str, np.ndarray]]] = []
    for datum in result.outputs:
        sig = tuple(sorted((k, v.shape[1:]) for k, v in datum.items()))
        if groups and tuple(sorted((k, v.shape[1:]) for k, v in groups[-1][0].items())) == sig:
            groups[-1].append(datum)
        else:
            groups.append([datum])
    for group in groups:
        record = out.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(group)
        for name in group[0]:
            record.fields[name].CopyFrom(_batched([d[name] for d in group], pb.DTYPE_FLOAT32, np.float32))
    for key, value in result.metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


def _topk(ids: list[list[int]], lps: list[list[float]]) -> pb.TopkLogprobs:
    msg = pb.TopkLogprobs()
    arr_ids = np.asarray(ids, dtype=np.int32)
    arr_lps = np.asarray(lps, dtype=np.float32)
    msg.length, msg.k = arr_ids.shape
    msg.token_ids = arr_ids.tobytes()
    msg.logprobs = arr_lps.tobytes()
    return msg


def sample_response(result: SampleResult) -> bytes:
    out = pb.SampleResponse()
    for seq in result.sequences:
        s = out.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
        if seq.topk_ids:
            s.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_ids, seq.topk_logprobs or []))
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype=np.float32).tobytes()
    if result.topk_prompt_ids is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk(result.topk_prompt_ids, result.topk_prompt_logprobs or []))
    out.prompt_cache_hit_tokens = result.prompt_cache_hit_tokens
    return out.SerializeToString()
