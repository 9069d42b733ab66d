"""The only place the sidecar gets TensorFlow Serving's protobuf modules from.

Every sidecar module imports TF Serving / TF framework messages and stubs from
here, never from ``tensorflow_serving`` or ``tensorflow`` directly, so the
source of the generated code can change in one place.
"""

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: F401
from tensorflow_serving.apis import (  # noqa: F401
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
