"""Request handling without gRPC: proto request in, proto response out, ServingErrors raised.

The servicers in :mod:`serving.servicer` only adapt these to RPCs.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from .batching import InferenceRunner
from .config import DEFAULT_SIGNATURE
from .errors import InvalidRequest
from .registry import ModelRegistry
from .tensors import TensorSpecInfo, decode_inputs, encode

SIGNATURE_DEF_FIELD = "signature_def"


def empty_outputs(specs: Mapping[str, TensorSpecInfo]) -> dict[str, np.ndarray]:
    """Zero-row outputs for a zero-row batch, from the output specs (inner dims known)."""
    import tensorflow as tf

    return {k: np.zeros((0, *s.shape[1:]), tf.dtypes.as_dtype(s.dtype).as_numpy_dtype)  # type: ignore[index]
            for k, s in specs.items()}


class ServingCore:
    def __init__(self, registry: ModelRegistry, runner: InferenceRunner):
        self.registry = registry
        self.runner = runner

    async def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not request.HasField("model_spec"):
            raise InvalidRequest("Missing ModelSpec")
        servable = self.registry.resolve(request.model_spec)
        sig_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        sig = servable.signature(sig_name)

        wanted = list(request.output_filter) or sorted(sig.outputs)
        for alias in wanted:
            if alias not in sig.outputs:
                raise InvalidRequest(f"output tensor alias not found in signature: {alias}. Outputs expected "
                                     f"to be in the set {{{','.join(sorted(sig.outputs))}}}.")
        if len(set(wanted)) != len(wanted):
            raise InvalidRequest(f"duplicate output tensor alias in output_filter: {list(request.output_filter)}")

        inputs = decode_inputs(request.inputs, sig.inputs)
        rows = None
        if sig.batchable:
            sizes = {k: v.shape[0] for k, v in inputs.items()}
            if len(set(sizes.values())) > 1:
                raise InvalidRequest(f"inputs must share their batch (first) dimension, got {sizes}")
            rows = next(iter(sizes.values()))
        if rows == 0 and all(s.shape is not None and None not in s.shape[1:] for s in sig.outputs.values()):
            outputs = empty_outputs(sig.outputs)  # kernels need not support empty batches
        else:
            outputs = await self.runner.run((servable.name, servable.version, sig.name), sig, inputs, rows)

        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = servable.name
        resp.model_spec.version.value = servable.version
        resp.model_spec.signature_name = sig.name
        for alias in wanted:
            resp.outputs[alias].CopyFrom(encode(outputs[alias]))
        return resp

    def get_model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                           ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise InvalidRequest("Missing ModelSpec")
        if not request.metadata_field:
            raise InvalidRequest("GetModelMetadataRequest must specify at least one metadata_field "
                                 f"(supported: {SIGNATURE_DEF_FIELD})")
        for f in request.metadata_field:
            if f != SIGNATURE_DEF_FIELD:
                raise InvalidRequest(f"Metadata field {f} is not supported (supported: {SIGNATURE_DEF_FIELD})")
        servable = self.registry.resolve(request.model_spec)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = servable.name
        resp.model_spec.version.value = servable.version
        resp.metadata[SIGNATURE_DEF_FIELD].Pack(servable.signature_def_map)
        return resp

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                         ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise InvalidRequest("Missing ModelSpec")
        spec = request.model_spec
        which = spec.WhichOneof("version_choice")
        version = None
        if which == "version":
            version = spec.version.value
        elif which == "version_label":
            version = self.registry.resolve(spec).version
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v, state in self.registry.status(spec.name, version):
            mvs = resp.model_version_status.add()
            mvs.version = v
            mvs.state = state
            mvs.status.error_code = 0  # OK
        return resp
