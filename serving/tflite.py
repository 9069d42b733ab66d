"""TensorFlow Lite models (``--prefer_tflite_model``): ``<version>/model.tflite`` served like a SavedModel.

As TF Serving's TfLiteSession: the signatures are those TF Serving's converter
stores in the model's ``signature_defs_metadata`` (a flexbuffer map of
serialized SignatureDefs); a model without them gets one ``serving_default``
signature whose aliases are the tensor names. Inputs are resized to the fed
shape, so x of shape [1] runs on a model built for [1, 1]. One interpreter per
version, one call at a time (``tf.lite.Interpreter`` is not thread-safe).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

TFLITE_FILE = "model.tflite"
SIGNATURE_METADATA = b"signature_defs_metadata"


def _tensor_name(name: str) -> str:
    return name.split(":")[0]


class TfLiteRunner:
    def __init__(self, path: Path):
        import warnings

        import tensorflow as tf

        file = path / TFLITE_FILE
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice, once per load
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(model_path=str(file))
        self.interpreter.allocate_tensors()
        self._inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
        self._outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        self._shapes = {d["index"]: tuple(int(s) for s in d["shape"]) for d in self._inputs.values()}
        self._lock = threading.Lock()
        self.signature_defs = self._read_signature_defs(file) or {"serving_default": self._default_signature()}

    # ------------------------------------------------------------ signatures
    @staticmethod
    def _read_signature_defs(file: Path) -> dict:
        from flatbuffers import flexbuffers
        from tensorflow.core.protobuf import meta_graph_pb2
        from tensorflow.lite.tools import flatbuffer_utils

        model = flatbuffer_utils.read_model(str(file))
        out = {}
        for md in model.metadata or ():
            if md.name != SIGNATURE_METADATA:
                continue
            entries = flexbuffers.GetRoot(bytes(model.buffers[md.buffer].data)).AsMap
            for key, value in zip(entries.Keys, entries.Values):
                sd = meta_graph_pb2.SignatureDef()
                sd.ParseFromString(value.AsStringBytes)
                out[key.AsKey] = sd
        return out

    def _default_signature(self):
        import tensorflow as tf
        from tensorflow.core.protobuf import meta_graph_pb2

        sd = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for target, details, shape_key in ((sd.inputs, self._inputs, "shape_signature"),
                                           (sd.outputs, self._outputs, "shape_signature")):
            for name, d in details.items():
                info = target[name]
                info.name = f"{name}:0"
                info.dtype = tf.as_dtype(d["dtype"]).as_datatype_enum
                for size in d.get(shape_key, d["shape"]):
                    info.tensor_shape.dim.add(size=int(size))
        return sd

    # ------------------------------------------------------------ calls
    def signature_fn(self, sig_def, trace_name: str = "") -> Callable:
        in_names = {k: _tensor_name(v.name) for k, v in sig_def.inputs.items()}
        out_names = {k: _tensor_name(v.name) for k, v in sig_def.outputs.items()}

        def run(inputs: Mapping[str, np.ndarray], aliases: tuple[str, ...]) -> dict[str, np.ndarray]:
            it = self.interpreter
            with self._lock:
                resized = False
                for alias, arr in inputs.items():
                    d = self._inputs[in_names[alias]]
                    if self._shapes[d["index"]] != arr.shape:
                        it.resize_tensor_input(d["index"], list(arr.shape), strict=False)
                        self._shapes[d["index"]] = arr.shape
                        resized = True
                if resized:
                    it.allocate_tensors()
                for alias, arr in inputs.items():
                    d = self._inputs[in_names[alias]]
                    it.set_tensor(d["index"], np.asarray(arr, dtype=d["dtype"]))
                it.invoke()
                return {a: np.array(it.get_tensor(self._outputs[out_names[a]]["index"])) for a in aliases}
        return run

    def close(self) -> None:
        pass
