"""The only place the sidecar gets TensorFlow Serving's protobuf modules from.

Every sidecar module imports TF Serving / TF framework messages and stubs from
here, never from ``tensorflow_serving`` or ``tensorflow`` directly. They come
from ``sidecar._tfproto``, generated from the vendored .proto files (``make
proto``): the same proto names and wire format as TF Serving's, no TensorFlow
installed or imported, and a descriptor pool of their own, so a real
TensorFlow may live in the same process (see ``sidecar/_tfproto/__init__.py``).

A message of these modules is not an instance of tensorflow-serving-api's class
of the same name; convert between the two with ``SerializeToString`` /
``FromString``.
"""

from .._tfproto import POOL, ReflectionPool  # noqa: F401
from .._tfproto.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: F401
from .._tfproto.tensorflow_serving.apis import (  # noqa: F401
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
