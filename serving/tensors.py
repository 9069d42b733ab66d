"""TensorProto <-> numpy with TF Serving's semantics, and input validation.

Decoding uses ``tf.make_ndarray`` and encoding ``tf.make_tensor_proto`` so a
stock client (``tf.make_tensor_proto`` in, ``tf.make_ndarray`` out) sees exactly
what TensorFlow Serving would give it. Validation checks every input against the
signature's ``TensorInfo`` before anything is decoded or run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from .errors import InvalidRequest

Shape = tuple[int | None, ...] | None  # None: unknown rank; None dim: any size


@dataclass(frozen=True)
class TensorSpecInfo:
    """dtype and shape of one signature input/output (from the SignatureDef's TensorInfo)."""

    dtype: int  # types_pb2.DataType enum
    shape: Shape

    @classmethod
    def from_tensor_info(cls, info) -> "TensorSpecInfo":
        ts = info.tensor_shape
        shape: Shape = None if ts.unknown_rank else tuple(d.size if d.size >= 0 else None for d in ts.dim)
        return cls(int(info.dtype), shape)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def shape_text(self) -> str:
        return shape_text(self.shape)

    @property
    def batchable(self) -> bool:
        """Rank >= 1, unknown batch dim, every other dim fixed: requests can be concatenated."""
        return (self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None
                and all(d is not None for d in self.shape[1:]))


def dtype_name(dtype: int) -> str:
    try:
        return f"{tf.dtypes.as_dtype(dtype).name} ({types_pb2.DataType.Name(dtype)})"
    except (TypeError, ValueError):
        return f"unknown dtype {dtype}"


def shape_text(shape: Shape) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def proto_shape(proto: tensor_pb2.TensorProto) -> Shape:
    ts = proto.tensor_shape
    return None if ts.unknown_rank else tuple(int(d.size) for d in ts.dim)


def check_input(alias: str, proto: tensor_pb2.TensorProto, spec: TensorSpecInfo) -> None:
    """dtype of one request tensor vs the signature, and a well-formed shape (no decoding).

    The shape is not compared with the signature's here: TF Serving hands the
    tensor to the graph, which decides (``serving.core.ServingCore._run``).
    """
    if proto.dtype != spec.dtype:
        raise InvalidRequest(
            f"input '{alias}' expects dtype {spec.dtype_name} but got {dtype_name(proto.dtype)}")
    shape = proto_shape(proto)
    if shape is None:
        raise InvalidRequest(f"input '{alias}' has unknown rank; expected shape {spec.shape_text()}")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input '{alias}' has negative dimension in shape {shape_text(shape)}")


def decode(alias: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    try:
        arr = tf.make_ndarray(proto)
    except Exception as exc:  # malformed content: wrong byte count, missing values, ...
        raise InvalidRequest(f"cannot decode input tensor '{alias}' of shape "
                             f"{shape_text(proto_shape(proto))}: {exc}") from exc
    expected = proto_shape(proto)
    if expected is not None and tuple(arr.shape) != expected:
        raise InvalidRequest(f"input tensor '{alias}' decodes to shape {list(arr.shape)}, "
                             f"declared {shape_text(expected)}")
    return arr


def decode_inputs(inputs: Mapping[str, tensor_pb2.TensorProto],
                  specs: Mapping[str, TensorSpecInfo]) -> dict[str, np.ndarray]:
    """Validate a PredictRequest's ``inputs`` against a signature and decode them."""
    sent, wanted = set(inputs), set(specs)
    expected = "{" + ",".join(sorted(wanted)) + "}"
    extra = sorted(sent - wanted)
    if extra:
        raise InvalidRequest(f"input tensor alias not found in signature: {','.join(extra)}. "
                             f"Inputs expected to be in the set {expected}.")
    missing = sorted(wanted - sent)
    if missing:
        raise InvalidRequest(f"input size does not match signature: {len(sent)}!={len(wanted)} "
                             f"len({{{','.join(sorted(sent))}}}) != len({expected}). Sent extra: {{}}. "
                             f"Missing but required: {{{','.join(missing)}}}. Inputs expected: "
                             + ", ".join(f"{k}: {specs[k].dtype_name} {specs[k].shape_text()}"
                                         for k in sorted(wanted)))
    for alias in sorted(sent):
        check_input(alias, inputs[alias], specs[alias])
    return {alias: decode(alias, inputs[alias]) for alias in sorted(sent)}


def encode(arr: np.ndarray) -> tensor_pb2.TensorProto:
    return tf.make_tensor_proto(arr)
