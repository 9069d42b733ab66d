"""TensorProto <-> numpy, the way TensorFlow does it, without TensorFlow.

``to_proto(array)`` writes what ``tf.make_tensor_proto(array)`` writes for a
numpy array: the dtype enum, the shape, and the values either as
``tensor_content`` (raw little-endian bytes, for more than one element of the
types TF packs that way) or in the repeated ``*_val`` field of the dtype.

``to_ndarray(proto, what, max_elements=...)`` reads what ``tf.make_ndarray``
reads, with TF's rule that a ``*_val`` field with fewer values than elements
repeats its last value (none at all means zeros). It validates before it
allocates: the declared shape is checked against ``max_elements`` first, so a
small message cannot declare a huge tensor and have it expanded. Bad content is
:class:`~sidecar.errors.InvalidInput` (INVALID_ARGUMENT), an oversize declared
tensor is :class:`~sidecar.errors.TooLarge` (RESOURCE_EXHAUSTED).

Supported dtypes: float16 (DT_HALF), float32, float64, int8/16/32/64,
uint8/16/32/64, bool, complex64/128 and string (bytes). Other DataType values
(bfloat16, quantized, float8, resource, variant...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput, TooLarge
from .tfapi import tensor_pb2, tensor_shape_pb2, types_pb2

# A declared tensor that must be expanded from repeated values (or zeros) is
# refused above this many elements when the caller gives no tighter limit.
EXPAND_LIMIT = 1 << 26


@dataclass(frozen=True)
class Kind:
    """How one DataType is stored: numpy dtype, the repeated field, content packing."""

    enum: int
    numpy: np.dtype
    field: str
    content: bool  # tf.make_tensor_proto writes tensor_content for size > 1

    @property
    def name(self) -> str:
        return types_pb2.DataType.Name(self.enum)


_T = types_pb2
KINDS: dict[int, Kind] = {k.enum: k for k in (
    Kind(_T.DT_FLOAT, np.dtype("<f4"), "float_val", True),
    Kind(_T.DT_DOUBLE, np.dtype("<f8"), "double_val", True),
    Kind(_T.DT_HALF, np.dtype("<f2"), "half_val", True),
    Kind(_T.DT_INT8, np.dtype("i1"), "int_val", True),
    Kind(_T.DT_INT16, np.dtype("<i2"), "int_val", True),
    Kind(_T.DT_INT32, np.dtype("<i4"), "int_val", True),
    Kind(_T.DT_INT64, np.dtype("<i8"), "int64_val", True),
    Kind(_T.DT_UINT8, np.dtype("u1"), "int_val", True),
    Kind(_T.DT_UINT16, np.dtype("<u2"), "int_val", False),
    Kind(_T.DT_UINT32, np.dtype("<u4"), "uint32_val", True),
    Kind(_T.DT_UINT64, np.dtype("<u8"), "uint64_val", True),
    Kind(_T.DT_BOOL, np.dtype("?"), "bool_val", False),
    Kind(_T.DT_COMPLEX64, np.dtype("<c8"), "scomplex_val", False),
    Kind(_T.DT_COMPLEX128, np.dtype("<c16"), "dcomplex_val", False),
    Kind(_T.DT_STRING, np.dtype(object), "string_val", False),
)}
_BY_NUMPY: dict[np.dtype, Kind] = {k.numpy.newbyteorder("="): k for k in KINDS.values() if k.enum != _T.DT_STRING}
VALUE_FIELDS = tuple(f.name for f in tensor_pb2.TensorProto.DESCRIPTOR.fields
                     if f.name.endswith("_val"))


def kind_of(enum: int, what: str = "tensor") -> Kind:
    kind = KINDS.get(enum)
    if kind is not None:
        return kind
    try:
        name = types_pb2.DataType.Name(enum)
    except ValueError:
        raise InvalidInput(f"{what}: unknown dtype enum {enum}") from None
    raise InvalidInput(f"{what}: dtype {name} is not supported")


def declared_shape(shape: tensor_shape_pb2.TensorShapeProto, what: str = "tensor") -> tuple[int, ...]:
    if shape.unknown_rank:
        raise InvalidInput(f"{what}: the shape has unknown rank")
    dims = tuple(int(d.size) for d in shape.dim)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{what}: negative dimension in shape {list(dims)}")
    return dims


def _count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d  # Python ints: no overflow on absurd declared shapes
    return n


def to_ndarray(proto: tensor_pb2.TensorProto, what: str = "tensor", max_elements: int | None = None,
               copy: bool = True) -> np.ndarray:
    """The numpy array of ``proto``; ``copy=False`` may return a read-only view of its bytes."""
    kind = kind_of(proto.dtype, what)
    dims = declared_shape(proto.tensor_shape, what)
    n = _count(dims)
    if max_elements is not None and n > max_elements:
        raise TooLarge(f"{what}: shape {list(dims)} holds {n} elements; the limit is {max_elements}")
    # the repeated value fields that hold values: ListFields names only the set ones (one C call)
    present = {f.name for f, _ in proto.ListFields()}
    used = [f for f in VALUE_FIELDS if f in present]
    if proto.tensor_content:
        if used:
            raise InvalidInput(f"{what}: both tensor_content and {used[0]} are set")
        if kind.enum == _T.DT_STRING:
            raise InvalidInput(f"{what}: {kind.name} cannot use tensor_content")
        if len(proto.tensor_content) != n * kind.numpy.itemsize:
            raise InvalidInput(f"{what}: tensor_content has {len(proto.tensor_content)} bytes; shape {list(dims)} "
                               f"of {kind.name} needs {n * kind.numpy.itemsize}")
        arr = np.frombuffer(proto.tensor_content, dtype=kind.numpy).reshape(dims)
        return arr.astype(kind.numpy.newbyteorder("="), copy=True) if copy else arr
    if any(f != kind.field for f in used):
        other = next(f for f in used if f != kind.field)
        raise InvalidInput(f"{what}: values are in {other}, but {kind.name} reads {kind.field}")
    return _from_values(proto, kind, dims, n, what, max_elements)


def _from_values(proto, kind: Kind, dims, n: int, what: str, max_elements: int | None) -> np.ndarray:
    field = getattr(proto, kind.field)
    m = len(field)
    if kind.enum in (_T.DT_COMPLEX64, _T.DT_COMPLEX128):
        if m % 2:
            raise InvalidInput(f"{what}: {kind.field} needs (real, imaginary) pairs, got {m} values")
        m //= 2
    if m > n:
        raise InvalidInput(f"{what}: {m} values for shape {list(dims)} of {n} elements")
    limit = EXPAND_LIMIT if max_elements is None else max_elements
    if m < n and n > limit:
        raise TooLarge(f"{what}: shape {list(dims)} would expand {m} values to {n} elements; "
                       f"the limit is {limit}")
    values = _values(field, kind, what)
    native = kind.numpy.newbyteorder("=") if kind.enum != _T.DT_STRING else kind.numpy
    if m == 0:
        if kind.enum == _T.DT_STRING:
            out = np.empty(n, dtype=object)
            out.fill(b"")
            return out.reshape(dims)
        return np.zeros(dims, dtype=native)
    if m < n:  # TF: the last value fills the rest
        values = np.concatenate([values, np.full(n - m, values[-1], dtype=values.dtype)])
    return values.astype(native, copy=False).reshape(dims)


def _values(field, kind: Kind, what: str) -> np.ndarray:
    if kind.enum == _T.DT_STRING:
        out = np.empty(len(field), dtype=object)
        out[:] = list(field)
        return out
    if kind.enum == _T.DT_HALF:  # half_val holds the 16 bits of each float16 in an int32
        bits = np.fromiter(field, dtype=np.int64, count=len(field))
        _check_range(bits, 0, 0xFFFF, what, kind)
        return bits.astype("<u2").view("<f2")
    if kind.enum in (_T.DT_COMPLEX64, _T.DT_COMPLEX128):
        parts = np.fromiter(field, dtype=np.float64 if kind.enum == _T.DT_COMPLEX128 else np.float32,
                            count=len(field))
        return parts.view(kind.numpy)
    if kind.field == "int_val":
        wide = np.fromiter(field, dtype=np.int64, count=len(field))
        info = np.iinfo(kind.numpy)
        _check_range(wide, int(info.min), int(info.max), what, kind)
        return wide.astype(kind.numpy)
    return np.fromiter(field, dtype=kind.numpy, count=len(field))


def _check_range(values: np.ndarray, lo: int, hi: int, what: str, kind: Kind) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        raise InvalidInput(f"{what}: {kind.field} holds a value outside {kind.name}'s range [{lo}, {hi}]")


def _kind_for(arr: np.ndarray) -> Kind:
    if arr.dtype.kind in "OSU":
        return KINDS[_T.DT_STRING]
    kind = _BY_NUMPY.get(arr.dtype.newbyteorder("="))
    if kind is None:
        raise TypeError(f"no TensorProto dtype for numpy {arr.dtype}")
    return kind


def to_proto(arr) -> tensor_pb2.TensorProto:
    """What ``tf.make_tensor_proto`` makes of a numpy array (or array-like)."""
    arr = np.asarray(arr)
    kind = _kind_for(arr)
    proto = tensor_pb2.TensorProto(dtype=kind.enum)
    proto.tensor_shape.SetInParent()  # TF writes the (empty) shape of a scalar too
    for d in arr.shape:
        proto.tensor_shape.dim.add(size=d)
    if kind.enum == _T.DT_STRING:
        proto.string_val.extend(v.encode() if isinstance(v, str) else bytes(v) for v in arr.ravel())
        return proto
    flat = np.ascontiguousarray(arr, dtype=kind.numpy).ravel()
    if kind.content and flat.size > 1:
        proto.tensor_content = flat.tobytes()
    elif kind.enum == _T.DT_HALF:
        proto.half_val.extend(flat.view("<u2").tolist())
    elif kind.enum in (_T.DT_COMPLEX64, _T.DT_COMPLEX128):
        getattr(proto, kind.field).extend(flat.view(flat.real.dtype).tolist())
    else:
        getattr(proto, kind.field).extend(flat.tolist())
    return proto
