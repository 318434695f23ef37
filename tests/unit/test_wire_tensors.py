"""Tensors of a forward_backward body: read as the SDK writes them, and every malformed or
oversized one refused with a message naming it, before anything is allocated for it."""

from __future__ import annotations

import numpy as np
import pytest

from tinkerd.api.sdk import pb
from tinkerd.api.tinker_wire import ElementBudget, WireError, tensor_to_numpy


def sparse(shape, crow, col, values, dtype=pb.DTYPE_FLOAT32) -> pb.Tensor:
    t = pb.Tensor(dtype=dtype, shape=shape)
    t.sparse_csr.crow_indices = np.asarray(crow, np.int64).tobytes()
    t.sparse_csr.col_indices = np.asarray(col, np.int64).tobytes()
    t.sparse_csr.values = np.asarray(values, np.float32).tobytes()
    return t


def test_a_sparse_tensor_is_made_dense_with_zeros():
    got = tensor_to_numpy(sparse([2, 3], [0, 1, 3], [2, 0, 1], [5.0, 6.0, 7.0]), "t")
    np.testing.assert_array_equal(got, [[0, 0, 5], [6, 7, 0]])


def test_bfloat16_is_widened_to_float32():
    words = (np.asarray([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    got = tensor_to_numpy(pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[2], dense=words.tobytes()), "t")
    np.testing.assert_array_equal(got, [1.5, -2.0])


def test_a_sparse_shape_is_bounded_before_the_dense_array_exists():
    with pytest.raises(WireError, match=r"t: 4294967296 values is more than 16777216 in one tensor"):
        tensor_to_numpy(sparse([2**16, 2**16], [0], [], []), "t")


def test_the_tensors_of_one_request_are_bounded_together():
    budget = ElementBudget(total=3 * 100)
    for _ in range(3):
        tensor_to_numpy(sparse([10, 10], [0] * 11, [], []), "t", budget)
    with pytest.raises(WireError, match="more than 300 values in all"):
        tensor_to_numpy(sparse([10, 10], [0] * 11, [], []), "t", budget)
