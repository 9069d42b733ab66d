"""TensorProto <-> numpy with TensorFlow's own functions, as real TF Serving
clients produce and expect them."""

from __future__ import annotations

import numpy as np
from .tfapi import tensor_pb2
from tensorflow.python.framework import tensor_util

from .errors import InvalidInput


def to_ndarray(proto: tensor_pb2.TensorProto, what: str = "tensor") -> np.ndarray:
    try:
        return tensor_util.MakeNdarray(proto)
    except Exception as exc:  # malformed content: wrong byte count, unknown dtype
        raise InvalidInput(f"{what}: cannot decode tensor ({exc})") from None


def to_proto(arr: np.ndarray) -> tensor_pb2.TensorProto:
    return tensor_util.make_tensor_proto(np.asarray(arr))
