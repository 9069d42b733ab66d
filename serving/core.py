"""Request handling without gRPC: proto request in, proto response out, ServingErrors raised.

The servicers in :mod:`serving.servicer` only adapt these to RPCs.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from .batching import InferenceRunner
from .config import DEFAULT_SIGNATURE
from .errors import InvalidRequest, Unimplemented
from .metrics import ServingMetrics
from .registry import ModelRegistry, Servable, Signature
from .tensors import TensorSpecInfo, decode_inputs, encode, shape_text

SIGNATURE_DEF_FIELD = "signature_def"


def empty_outputs(specs: Mapping[str, TensorSpecInfo]) -> dict[str, np.ndarray]:
    """Zero-row outputs for a zero-row batch, from the output specs (inner dims known)."""
    import tensorflow as tf

    return {k: np.zeros((0, *s.shape[1:]), tf.dtypes.as_dtype(s.dtype).as_numpy_dtype)  # type: ignore[index]
            for k, s in specs.items()}


MAX_LENIENT_RANK = 2  # see ServingCore._run
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def _join(keys) -> str:
    return ",".join(sorted(keys))


def serialized_examples(inp) -> np.ndarray:
    """An ``Input`` (example_list or example_list_with_context) -> DT_STRING [n] of serialized Examples.

    As TF Serving: with a context, each row is the context's bytes followed by
    the example's (protobuf merges them, the example's features winning).
    """
    which = inp.WhichOneof("kind")
    if which == "example_list":
        rows = [e.SerializeToString() for e in inp.example_list.examples]
    elif which == "example_list_with_context":
        ctx = inp.example_list_with_context.context.SerializeToString()
        rows = [ctx + e.SerializeToString() for e in inp.example_list_with_context.examples]
    else:
        rows = []
    if not rows:
        raise InvalidRequest("Input is empty.")
    return np.array(rows, dtype=object)


def _shape_matches(arr: np.ndarray, spec: TensorSpecInfo) -> bool:
    return spec.shape is None or (arr.ndim == len(spec.shape) and all(
        w is None or w == d for d, w in zip(arr.shape, spec.shape)))


class ServingCore:
    def __init__(self, registry: ModelRegistry, runner: InferenceRunner, metrics: ServingMetrics | None = None):
        self.registry = registry
        self.runner = runner
        self.metrics = metrics or ServingMetrics()

    async def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not request.HasField("model_spec"):
            raise InvalidRequest("Missing ModelSpec")
        servable = self.registry.resolve(request.model_spec)
        sig_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        sig = servable.signature(sig_name)

        seen: set[str] = set()
        for alias in request.output_filter:
            if alias not in sig.outputs:
                raise InvalidRequest(f"output tensor alias not found in signature: {alias} Outputs expected "
                                     f"to be in the set {{{_join(sig.outputs)}}}.")
            if alias in seen:
                raise InvalidRequest(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        wanted = list(request.output_filter) or sorted(sig.outputs)

        inputs = decode_inputs(request.inputs, sig.inputs)
        outputs = await self._run(servable, sig, inputs, tuple(wanted))

        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = servable.name
        resp.model_spec.version.value = servable.version
        resp.model_spec.signature_name = sig.name
        for alias in wanted:
            resp.outputs[alias].CopyFrom(encode(outputs[alias]))
        return resp

    async def _run(self, servable: Servable, sig: Signature, inputs: dict[str, np.ndarray],
                   wanted: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Run a signature: batched with other requests when every input has the declared shape.

        An input of another shape (TF Serving passes it on, e.g. ``x`` of shape [1] for a
        signature declared [-1,1]) runs alone, and the graph decides: if it rejects the
        input, the answer names the declared shape as well as the graph's error. One
        exception, for safety: a wrong RANK for an input declared with rank 3 or more
        (images, sequences) is refused here, because TensorFlow's fused convolution
        kernels abort the whole process on one instead of returning an error (measured
        with a rank-3 image into a Keras CNN: "Check failed: index >= 0 && index <
        num_total_dims" in tensor_format.h).
        """
        exact = all(_shape_matches(v, sig.inputs[k]) for k, v in inputs.items())
        if not exact:
            for k, v in sorted(inputs.items()):
                declared = sig.inputs[k].shape
                if declared is not None and len(declared) >= MAX_LENIENT_RANK + 1 and v.ndim != len(declared):
                    raise InvalidRequest(
                        f"input '{k}' expects shape {sig.inputs[k].shape_text()} (rank {len(declared)}) "
                        f"but got {shape_text(v.shape)} (rank {v.ndim})")
        rows = None
        if sig.batchable and exact:
            sizes = {k: v.shape[0] for k, v in inputs.items()}
            if len(set(sizes.values())) > 1:
                raise InvalidRequest(f"inputs must share their batch (first) dimension, got {sizes}")
            rows = next(iter(sizes.values()))
        if rows == 0 and all(sig.outputs[a].shape is not None and None not in sig.outputs[a].shape[1:]
                             for a in wanted):
            return empty_outputs({a: sig.outputs[a] for a in wanted})  # kernels need not support empty batches
        fn = functools.partial(sig.run, outputs=wanted)
        try:
            return await self.runner.run((servable.name, servable.version, sig.name, wanted), fn, inputs, rows)
        except Exception as exc:
            if exact or type(exc).__name__ != "InvalidArgumentError":
                raise
            bad = sorted(k for k, v in inputs.items() if not _shape_matches(v, sig.inputs[k]))
            detail = "; ".join(
                f"input '{k}' expects shape {sig.inputs[k].shape_text()} (rank {len(sig.inputs[k].shape or ())}) "
                f"but got {shape_text(inputs[k].shape)} (rank {inputs[k].ndim})" for k in bad)
            raise InvalidRequest(f"{detail}, which the model rejected: "
                                 f"{getattr(exc, 'message', None) or exc}") from exc

    def _example_signature(self, model_spec, kind: str) -> tuple[Servable, Signature]:
        if not model_spec.name:
            raise InvalidRequest("Missing ModelSpec")
        servable = self.registry.resolve(model_spec)
        name = model_spec.signature_name or DEFAULT_SIGNATURE
        sig = servable.signatures.get(name)
        if sig is None:
            raise InvalidRequest(f"No signature was found with the name: {name}")
        if len(sig.inputs) != 1:
            raise InvalidRequest("Expected one input Tensor.")
        input_key = "inputs"
        if input_key not in sig.inputs:
            raise InvalidRequest(f"No {kind} inputs found in SignatureDef: {name}")
        if kind == "classification":
            if len(sig.outputs) not in (1, 2):
                raise InvalidRequest(f"Expected one or two output Tensors, found {len(sig.outputs)}")
            if not {"classes", "scores"} & set(sig.outputs):
                raise InvalidRequest("Expected classification signature outputs to contain at least one of "
                                     f"\"classes\" or \"scores\". Signature was: {name}")
        else:
            if len(sig.outputs) != 1:
                raise InvalidRequest("Expected one output Tensor.")
            if "outputs" not in sig.outputs:
                raise InvalidRequest(f"No regression outputs found in SignatureDef: {name}")
        return servable, sig

    async def _classify(self, servable: Servable, sig: Signature, examples: np.ndarray, result) -> None:
        wanted = tuple(a for a in ("classes", "scores") if a in sig.outputs)
        out = await self.runner.run((servable.name, servable.version, sig.name, wanted),
                                    functools.partial(sig.run, outputs=wanted), {"inputs": examples}, None)
        n = len(examples)
        classes, scores = out.get("classes"), out.get("scores")
        for what, t in (("classes", classes), ("scores", scores)):
            if t is None:
                continue
            if t.ndim != 2:
                raise InvalidRequest(f"Expected Tensor shape: [batch_size num_classes] but got {list(t.shape)}")
            if what == "scores" and t.dtype != np.float32:
                raise InvalidRequest(f"Expected scores Tensor of DT_FLOAT. Got: {t.dtype}")
            if what == "classes" and t.dtype != np.object_:
                raise InvalidRequest(f"Expected classes Tensor of DT_STRING. Got: {t.dtype}")
            if t.shape[0] != n:
                raise InvalidRequest(f"Expected {what} output batch size of {n}. Got: {t.shape[0]}")
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise InvalidRequest("Tensors class and score should match in dim_size(1). "
                                 f"Got {classes.shape[1]} vs. {scores.shape[1]}")
        num_classes = (classes if classes is not None else scores).shape[1]
        for i in range(n):
            row = result.classifications.add()
            for c in range(num_classes):
                cl = row.classes.add()
                if classes is not None:
                    cl.label = bytes(classes[i, c]).decode("utf-8", "replace")
                if scores is not None:
                    cl.score = float(scores[i, c])

    async def _regress(self, servable: Servable, sig: Signature, examples: np.ndarray, result) -> None:
        out = (await self.runner.run((servable.name, servable.version, sig.name, ("outputs",)),
                                     functools.partial(sig.run, outputs=("outputs",)), {"inputs": examples},
                                     None))["outputs"]
        n = len(examples)
        if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
            raise InvalidRequest("Expected output Tensor shape to be either [batch_size] or "
                                 f"[batch_size, 1] but got {list(out.shape)}")
        if out.shape[0] != n:
            raise InvalidRequest(f"Input batch size did not match output batch size: {n} vs. {out.shape[0]}")
        if out.dtype != np.float32:
            raise InvalidRequest(f"Expected output Tensor of DT_FLOAT.  Got: {out.dtype}")
        for v in out.reshape(-1):
            result.regressions.add().value = float(v)

    @staticmethod
    def _spec(into, servable: Servable, sig: Signature) -> None:
        into.name = servable.name
        into.version.value = servable.version
        into.signature_name = sig.name

    async def classify(self, request: classification_pb2.ClassificationRequest
                       ) -> classification_pb2.ClassificationResponse:
        servable, sig = self._example_signature(request.model_spec, "classification")
        resp = classification_pb2.ClassificationResponse()
        self._spec(resp.model_spec, servable, sig)
        await self._classify(servable, sig, serialized_examples(request.input), resp.result)
        return resp

    async def regress(self, request: regression_pb2.RegressionRequest) -> regression_pb2.RegressionResponse:
        servable, sig = self._example_signature(request.model_spec, "regression")
        resp = regression_pb2.RegressionResponse()
        self._spec(resp.model_spec, servable, sig)
        await self._regress(servable, sig, serialized_examples(request.input), resp.result)
        return resp

    async def multi_inference(self, request: inference_pb2.MultiInferenceRequest
                              ) -> inference_pb2.MultiInferenceResponse:
        """Several classify/regress signatures of ONE model on the same examples (TF Serving's rules)."""
        if not request.tasks:
            raise InvalidRequest("MultiInferenceRequest must contain at least one task")
        model_name, signatures = "", set()
        for task in request.tasks:
            if not task.model_spec.name:
                raise InvalidRequest("Found ModelSpec with an empty model name.")
            if model_name and task.model_spec.name != model_name:
                raise InvalidRequest("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            model_name = task.model_spec.name
            sig_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if sig_name in signatures:
                raise InvalidRequest(f"Duplicate evaluation of signature: {sig_name}")
            signatures.add(sig_name)
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise Unimplemented(f"Unsupported signature method_name: {task.method_name}")
        examples = serialized_examples(request.input)
        resp = inference_pb2.MultiInferenceResponse()
        servable = self.registry.resolve(request.tasks[0].model_spec)  # one version for every task
        for task in request.tasks:
            spec = type(task.model_spec)()
            spec.CopyFrom(task.model_spec)
            spec.ClearField("version_choice")
            spec.version.value = servable.version
            kind = "classification" if task.method_name == CLASSIFY_METHOD else "regression"
            _, sig = self._example_signature(spec, kind)
            if sig.name not in servable.signatures:
                raise InvalidRequest(f"Requested signature not found in model graph: {sig.name}")
            result = resp.results.add()
            self._spec(result.model_spec, servable, sig)
            if kind == "classification":
                await self._classify(servable, sig, examples, result.classification_result)
            else:
                await self._regress(servable, sig, examples, result.regression_result)
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
