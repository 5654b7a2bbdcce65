import pytest
import torch

from mmserve.errors import InvalidInputError
from mmserve.proto import tensor_pb2
from mmserve.tensor_codec import tensor_from_pb, tensor_to_pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_is_bit_exact(dtype):
    original = (torch.randn(5, 7) * 100).to(dtype)
    message = tensor_to_pb(original)
    assert message.dtype == str(dtype).removeprefix("torch.")
    assert list(message.shape) == [5, 7]
    back = tensor_from_pb(tensor_pb2.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, original)


def test_non_contiguous_and_empty():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(tensor_from_pb(tensor_to_pb(t)), t)
    assert tensor_from_pb(tensor_to_pb(torch.empty(0, 8))).shape == (0, 8)


def test_size_mismatch_and_bad_dtype_are_invalid_input():
    with pytest.raises(InvalidInputError, match="needs 24 bytes, got 23"):
        tensor_from_pb(tensor_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"x" * 23))
    with pytest.raises(InvalidInputError, match="unsupported tensor dtype"):
        tensor_from_pb(tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"x" * 8))
    with pytest.raises(InvalidInputError, match="negative"):
        tensor_from_pb(tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""))
