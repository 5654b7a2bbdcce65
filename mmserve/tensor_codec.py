"""Tensors on the wire: dtype name + shape + raw little-endian bytes (bfloat16 included)."""

import sys

import torch

from mmserve.errors import InvalidInputError
from mmserve.proto import tensor_pb2

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts are not supported"


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise InvalidInputError(
            f"unsupported tensor dtype {name!r}; expected one of {sorted(_DTYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def tensor_to_pb(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    tensor = tensor.detach().to("cpu").contiguous()
    # A uint8 view gives the raw bytes for every dtype, bfloat16 included (numpy has no bfloat16).
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return tensor_pb2.Tensor(dtype=dtype_name(tensor.dtype), shape=list(tensor.shape), data=raw)


def tensor_from_pb(message: tensor_pb2.Tensor) -> torch.Tensor:
    dtype = dtype_from_name(message.dtype)
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInputError(f"tensor shape {list(shape)} has a negative dimension")
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != numel * itemsize:
        raise InvalidInputError(
            f"tensor of shape {list(shape)} and dtype {message.dtype} needs {numel * itemsize} bytes, "
            f"got {len(message.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
