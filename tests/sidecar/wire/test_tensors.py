"""sidecar.wire.tensors against TensorFlow's own make_tensor_proto / make_ndarray.

The sidecar's messages live in a descriptor pool of their own, so TensorFlow can
be imported in this same process; protos cross between the two as bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.wire import tensors
from sidecar.errors import InvalidInput, TooLarge
from sidecar.wire.tfapi import tensor_pb2, types_pb2

NUMERIC = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
           np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]
SHAPES = [(), (0,), (1,), (3,), (2, 3), (1, 32, 32, 3), (2, 0, 3)]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 60
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def _ours(tf_proto) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto.FromString(tf_proto.SerializeToString())


def _proto(dtype=types_pb2.DT_FLOAT, shape=(), **fields) -> tensor_pb2.TensorProto:
    p = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for d in shape:
        p.tensor_shape.dim.add(size=d)
    return p


# --- against TensorFlow --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda d: np.dtype(d).name)
def test_to_proto_writes_what_tf_writes(tf, dtype, shape):
    x = _sample(dtype, shape)
    ref = tf.make_tensor_proto(x)
    assert tensors.to_proto(x).SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda d: np.dtype(d).name)
def test_to_ndarray_reads_what_tf_reads(tf, dtype, shape):
    ref = tf.make_tensor_proto(_sample(dtype, shape, seed=1))
    ours, theirs = tensors.to_ndarray(_ours(ref)), tf.make_ndarray(ref)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_strings_match_tf(tf):
    for x in (np.array([b"a", b"", b"\xff\x00"], dtype=object), np.array([["a", "\u00e9"], ["xy", ""]]),
              np.array(b"scalar", dtype=object)):
        ref = tf.make_tensor_proto(x)
        assert tensors.to_proto(x).SerializeToString() == ref.SerializeToString()
        assert tensors.to_ndarray(_ours(ref)).tolist() == tf.make_ndarray(ref).tolist()


@pytest.mark.parametrize("dtype,field,values", [
    (types_pb2.DT_FLOAT, "float_val", [1.5, -2.0]),
    (types_pb2.DT_INT32, "int_val", [7]),
    (types_pb2.DT_UINT8, "int_val", [3, 255]),
    (types_pb2.DT_INT64, "int64_val", [2**40]),
    (types_pb2.DT_BOOL, "bool_val", [True, False]),
    (types_pb2.DT_HALF, "half_val", [0x3C00, 0xC000]),
    (types_pb2.DT_COMPLEX64, "scomplex_val", [1.0, 2.0, 3.0, -4.0]),
    (types_pb2.DT_STRING, "string_val", [b"x", b"last"]),
    (types_pb2.DT_DOUBLE, "double_val", []),
    (types_pb2.DT_STRING, "string_val", []),
])
def test_fewer_values_than_elements_repeat_the_last_like_tf(tf, dtype, field, values):
    from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2

    p = _proto(dtype, (2, 3))
    getattr(p, field).extend(values)
    theirs = tf.make_ndarray(tf_tensor_pb2.TensorProto.FromString(p.SerializeToString()))
    ours = tensors.to_ndarray(p)
    assert ours.shape == (2, 3) and ours.dtype == theirs.dtype
    if dtype == types_pb2.DT_STRING:  # TF pads an empty string field with str ""; the sidecar keeps bytes
        assert [bytes(v) if v else b"" for v in ours.ravel()] == [v.encode() if isinstance(v, str) else v
                                                                   for v in theirs.ravel()]
    else:
        np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.dtype(d) for d in NUMERIC]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_round_trip_matches_tf_for_any_array(tf, x):
    ref = tf.make_tensor_proto(x)
    assert tensors.to_proto(x).SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(tensors.to_ndarray(tensors.to_proto(x)), tf.make_ndarray(ref))


# --- without TensorFlow --------------------------------------------------------------------------


def test_round_trip_keeps_dtype_shape_and_values():
    for dtype in NUMERIC:
        for shape in SHAPES:
            x = _sample(dtype, shape, seed=2)
            y = tensors.to_ndarray(tensors.to_proto(x))
            assert y.dtype == x.dtype and y.shape == x.shape
            np.testing.assert_array_equal(y, x)


def test_big_endian_input_is_written_little_endian():
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    p = tensors.to_proto(x)
    assert p.tensor_content == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(tensors.to_ndarray(p), x)


def test_copy_false_returns_a_read_only_view_and_copy_true_a_writable_array():
    p = tensors.to_proto(np.ones((4, 4), np.float32))
    view = tensors.to_ndarray(p, copy=False)
    assert not view.flags.writeable
    owned = tensors.to_ndarray(p)
    owned[0, 0] = 5  # must not raise
    assert tensors.to_ndarray(p)[0, 0] == 1


def test_unknown_dtype_enum_is_invalid():
    with pytest.raises(InvalidInput, match="unknown dtype enum 999"):
        tensors.to_ndarray(_proto(999, (1,), float_val=[1.0]))


@pytest.mark.parametrize("enum", [types_pb2.DT_BFLOAT16, types_pb2.DT_QINT8, types_pb2.DT_RESOURCE,
                                  types_pb2.DT_VARIANT, types_pb2.DT_FLOAT8_E4M3FN, types_pb2.DT_INVALID])
def test_known_but_unsupported_dtypes_are_refused_by_name(enum):
    with pytest.raises(InvalidInput, match=types_pb2.DataType.Name(enum)):
        tensors.to_ndarray(_proto(enum, (1,)))


def test_negative_dimension_is_invalid():
    with pytest.raises(InvalidInput, match="negative dimension"):
        tensors.to_ndarray(_proto(types_pb2.DT_FLOAT, (2, -1), float_val=[1.0]))


def test_unknown_rank_is_invalid():
    p = _proto(types_pb2.DT_FLOAT, float_val=[1.0])
    p.tensor_shape.unknown_rank = True
    with pytest.raises(InvalidInput, match="unknown rank"):
        tensors.to_ndarray(p)


@pytest.mark.parametrize("n_bytes", [0 + 1, 4 * 6 - 1, 4 * 6 + 4])
def test_content_byte_count_must_match_the_shape(n_bytes):
    with pytest.raises(InvalidInput, match="tensor_content has"):
        tensors.to_ndarray(_proto(types_pb2.DT_FLOAT, (2, 3), tensor_content=b"\0" * n_bytes))


def test_declared_shape_is_checked_before_anything_is_expanded():
    # one value declaring 10**12 elements: refused at once, nothing allocated
    p = _proto(types_pb2.DT_FLOAT, (10**6, 10**6), float_val=[1.0])
    with pytest.raises(TooLarge, match="limit is 1000"):
        tensors.to_ndarray(p, "input 'image'", max_elements=1000)
    with pytest.raises(TooLarge, match="would expand"):  # no caller limit: the module's expansion limit holds
        tensors.to_ndarray(p)
    big = _proto(types_pb2.DT_FLOAT, (10**9,), tensor_content=b"\0" * 8)
    with pytest.raises(TooLarge):
        tensors.to_ndarray(big, max_elements=10**6)
    with pytest.raises(InvalidInput, match="needs 4000000000"):
        tensors.to_ndarray(big)


def test_limit_counts_elements_not_values():
    p = tensors.to_proto(np.zeros((2, 32, 32, 3), np.float32))
    assert tensors.to_ndarray(p, max_elements=2 * 32 * 32 * 3).shape == (2, 32, 32, 3)
    with pytest.raises(TooLarge, match="6144 elements; the limit is 6143"):
        tensors.to_ndarray(p, max_elements=2 * 32 * 32 * 3 - 1)


def test_more_values_than_elements_is_invalid():
    with pytest.raises(InvalidInput, match="3 values for shape"):
        tensors.to_ndarray(_proto(types_pb2.DT_FLOAT, (2,), float_val=[1, 2, 3]))


def test_values_in_the_wrong_field_or_in_two_places_are_invalid():
    with pytest.raises(InvalidInput, match="values are in int_val"):
        tensors.to_ndarray(_proto(types_pb2.DT_FLOAT, (2,), int_val=[1, 2]))
    with pytest.raises(InvalidInput, match="both tensor_content and float_val"):
        tensors.to_ndarray(_proto(types_pb2.DT_FLOAT, (1,), float_val=[1.0], tensor_content=b"\0" * 4))
    with pytest.raises(InvalidInput, match="cannot use tensor_content"):
        tensors.to_ndarray(_proto(types_pb2.DT_STRING, (1,), tensor_content=b"abcd"))


@pytest.mark.parametrize("dtype,field,value", [
    (types_pb2.DT_UINT8, "int_val", 256), (types_pb2.DT_INT8, "int_val", -129),
    (types_pb2.DT_UINT16, "int_val", -1), (types_pb2.DT_HALF, "half_val", 0x10000),
])
def test_values_outside_the_dtype_range_are_invalid(dtype, field, value):
    p = _proto(dtype, (1,))
    getattr(p, field).append(value)
    with pytest.raises(InvalidInput, match="outside"):
        tensors.to_ndarray(p)


def test_complex_values_come_in_pairs():
    with pytest.raises(InvalidInput, match="pairs"):
        tensors.to_ndarray(_proto(types_pb2.DT_COMPLEX64, (1,), scomplex_val=[1.0, 2.0, 3.0]))


def test_error_names_what_was_decoded():
    with pytest.raises(InvalidInput, match="^input 'image': "):
        tensors.to_ndarray(_proto(999), "input 'image'")


def test_numpy_types_without_a_tensor_dtype_are_refused():
    with pytest.raises(TypeError):
        tensors.to_proto(np.array(["2020-01-01"], dtype="datetime64[D]"))
