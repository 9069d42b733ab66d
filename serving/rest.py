"""TF Serving's REST API (v1) on ``--rest_api_port``, over the same core as gRPC.

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   model metadata
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row ("instances") or columnar ("inputs")
    POST ...:classify / ...:regress                               {"examples": [...], "context": {...}}
    GET  <prometheus path>                                        when --monitoring_config_file enables it

JSON follows TF Serving's (``json_tensor.cc``): a DT_STRING value may be
``{"b64": "..."}``; output aliases ending in ``_bytes`` come back base64-encoded
as ``{"b64": ...}``; errors are ``{"error": "..."}`` with TF Serving's HTTP codes;
status and metadata print fields with default values, as TF Serving does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    regression_pb2,
)

from .core import SIGNATURE_DEF_FIELD, ServingCore
from .errors import InvalidRequest, ServingError, grpc_status
from .metrics import CONTENT_TYPE_LATEST
from .tensors import encode

log = logging.getLogger("serving")

C = grpc.StatusCode
HTTP_STATUS = {  # TF Serving's ToHTTPStatusCode
    C.OK: 200, C.CANCELLED: 499, C.UNKNOWN: 500, C.INVALID_ARGUMENT: 400, C.DEADLINE_EXCEEDED: 504,
    C.NOT_FOUND: 404, C.ALREADY_EXISTS: 409, C.PERMISSION_DENIED: 403, C.RESOURCE_EXHAUSTED: 429,
    C.FAILED_PRECONDITION: 412, C.ABORTED: 409, C.OUT_OF_RANGE: 403, C.UNIMPLEMENTED: 501,
    C.INTERNAL: 500, C.UNAVAILABLE: 503, C.DATA_LOSS: 500, C.UNAUTHENTICATED: 401,
}

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>predict|classify|regress)|/(?P<metadata>metadata))?$")


class NotFoundPath(ServingError):
    pass


def _spec(m: re.Match, into) -> None:
    into.name = m["name"]
    if m["version"]:
        into.version.value = int(m["version"])
    elif m["label"]:
        into.version_label = m["label"]


def _dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# ------------------------------------------------------------------ JSON <-> tensors

def _b64(value: dict) -> bytes:
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InvalidRequest('a binary value is {"b64": "<base64>"}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("b64 value is not valid base64") from None


def _strings(value):
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if isinstance(value, dict):
        return _b64(value)
    if isinstance(value, str):
        return value.encode()
    raise InvalidRequest(f"expected a string or {{\"b64\": ...}}, got {json.dumps(value)[:40]}")


def json_to_array(value, dtype_enum: int, what: str) -> np.ndarray:
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(dtype_enum)
    try:
        if dtype == tf.string:
            return np.array(_strings(value), dtype=object)
        arr = np.array(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{what}: cannot convert JSON value to {dtype.name}: {exc}") from None
    if arr.dtype == object:
        raise InvalidRequest(f"{what}: ragged JSON array (every list at a depth must have the same length)")
    return arr


def _plain(arr: np.ndarray, alias: str):
    """An output tensor as JSON: float32 with the shortest decimal that reads back the same."""
    if arr.dtype == np.object_:
        if alias.endswith("_bytes"):
            flat = [{"b64": base64.b64encode(bytes(v)).decode()} for v in arr.reshape(-1)]
        else:
            flat = [bytes(v).decode("utf-8", "replace") for v in arr.reshape(-1)]
    elif arr.dtype == np.float32:
        flat = [float(str(v)) for v in arr.reshape(-1)]  # str(np.float32) is the shortest round trip
    else:
        return arr.tolist()
    if arr.ndim == 0:
        return flat[0]
    return np.array(flat, dtype=object).reshape(arr.shape).tolist()


def predict_request(body: Any, m: re.Match, signature_inputs: dict) -> tuple[predict_pb2.PredictRequest, bool]:
    """A REST predict body -> (PredictRequest, row format?); ``signature_inputs`` alias -> dtype."""
    if not isinstance(body, dict):
        raise InvalidRequest("JSON Value: not an object. Expecting 'instances' or 'inputs'")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidRequest("Missing 'inputs' or 'instances' key" if "instances" not in body
                             else "Not both 'inputs' and 'instances' keys may be present")
    req = predict_pb2.PredictRequest()
    _spec(m, req.model_spec)
    sig = body.get("signature_name", "")
    if not isinstance(sig, str):
        raise InvalidRequest("'signature_name' must be a string")
    req.model_spec.signature_name = sig
    row = "instances" in body

    def named(v) -> bool:
        return isinstance(v, dict) and set(v) != {"b64"}

    if row:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidRequest("'instances' must be a non-empty JSON list")
        if named(instances[0]):
            keys = set(instances[0])
            if any(not named(i) or set(i) != keys for i in instances):
                raise InvalidRequest("every instance must be an object with the same keys")
            values = {k: [i[k] for i in instances] for k in keys}
        else:
            values = {None: instances}
    else:
        values = body["inputs"] if named(body["inputs"]) else {None: body["inputs"]}
    for alias, value in values.items():
        if alias is None:
            if len(signature_inputs) != 1:
                raise InvalidRequest(f"the signature has {len(signature_inputs)} inputs "
                                     f"({','.join(sorted(signature_inputs))}); name them")
            alias = next(iter(signature_inputs))
        if alias not in signature_inputs:
            raise InvalidRequest(f"input tensor alias not found in signature: {alias}. Inputs expected to be in "
                                 f"the set {{{','.join(sorted(signature_inputs))}}}.")
        req.inputs[alias].CopyFrom(encode(json_to_array(value, signature_inputs[alias], f"input {alias!r}")))
    return req, row


def predict_json(resp: predict_pb2.PredictResponse, row: bool) -> dict:
    import tensorflow as tf

    outs = {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}
    if not row:
        if len(outs) == 1:
            (alias, arr), = outs.items()
            return {"outputs": _plain(arr, alias)}
        return {"outputs": {k: _plain(v, k) for k, v in outs.items()}}
    if len(outs) == 1:
        (alias, arr), = outs.items()
        return {"predictions": _plain(arr, alias)}
    sizes = {v.shape[0] if v.ndim else None for v in outs.values()}
    if len(sizes) != 1 or None in sizes:
        raise InvalidRequest("Tensor name: outputs have different batch sizes; use the columnar ('inputs') format")
    n = sizes.pop()
    cols = {k: _plain(v, k) for k, v in outs.items()}
    return {"predictions": [{k: cols[k][i] for k in cols} for i in range(n)]}


def _feature(value, into, what: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InvalidRequest(f"feature {what!r}: empty list")
    if all(isinstance(v, (str, dict)) for v in values):
        into.bytes_list.value.extend(_strings(values))
    elif all(isinstance(v, bool) for v in values):
        raise InvalidRequest(f"feature {what!r}: booleans are not a tf.Example type")
    elif all(isinstance(v, int) for v in values):
        into.int64_list.value.extend(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        into.float_list.value.extend(float(v) for v in values)
    else:
        raise InvalidRequest(f"feature {what!r}: mixed or unsupported value types")


def _example(obj, into) -> None:
    if not isinstance(obj, dict):
        raise InvalidRequest("an example is a JSON object of feature: value")
    for k, v in obj.items():
        _feature(v, into.features.feature[k], k)


def example_input(body: Any, request) -> None:
    """``{"signature_name", "context", "examples"}`` -> a Classification/RegressionRequest's spec and input."""
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list):
        raise InvalidRequest("Missing 'examples' key: expected a JSON list of objects")
    sig = body.get("signature_name", "")
    if not isinstance(sig, str):
        raise InvalidRequest("'signature_name' must be a string")
    request.model_spec.signature_name = sig
    if "context" in body:
        target = request.input.example_list_with_context
        _example(body["context"], target.context)
    else:
        target = request.input.example_list
    for e in body["examples"]:
        _example(e, target.examples.add())


# ------------------------------------------------------------------ the app

class RestServer:
    def __init__(self, core: ServingCore, timeout_ms: int = 30000, prometheus_path: str = "",
                 max_body_bytes: int = 64 << 20):
        self.core = core
        self.timeout = timeout_ms / 1000.0
        self.prometheus_path = prometheus_path
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self.prometheus_path and request.path == self.prometheus_path and request.method == "GET":
            return web.Response(body=self.core.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        m = _PATH.match(request.path)
        api = (m["verb"] or ("metadata" if m["metadata"] else "status")) if m else "unknown"
        with self.core.metrics.request(m["name"] if m else "", api, "REST") as done:
            try:
                if m is None:
                    raise NotFoundPath(f"Malformed request: {request.method} {request.path}")
                body = await asyncio.wait_for(self._dispatch(request, m), self.timeout)
            except Exception as exc:  # noqa: BLE001 - the one mapping point for REST
                if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                    code, message = C.DEADLINE_EXCEEDED, f"request did not finish in {self.timeout:g} s"
                elif isinstance(exc, NotFoundPath):
                    code, message = C.NOT_FOUND, str(exc)
                else:
                    code, message = grpc_status(exc)
                done(code.name)
                if code == C.INTERNAL:
                    log.error("REST %s %s failed", request.method, request.path, exc_info=exc)
                return web.json_response({"error": message}, status=HTTP_STATUS.get(code, 500))
            done("OK")
        return web.Response(text=json.dumps(body, indent=1), content_type="application/json")

    async def _dispatch(self, request: web.Request, m: re.Match) -> dict:
        verb = m["verb"]
        if request.method == "GET" and verb is None:
            if m["metadata"]:
                req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
                _spec(m, req.model_spec)
                resp = self.core.get_model_metadata(req)
                sdm = get_model_metadata_pb2.SignatureDefMap()
                resp.metadata[SIGNATURE_DEF_FIELD].Unpack(sdm)
                return {"model_spec": _dict(resp.model_spec), "metadata": {SIGNATURE_DEF_FIELD: _dict(sdm)}}
            req = get_model_status_pb2.GetModelStatusRequest()
            _spec(m, req.model_spec)
            return _dict(self.core.get_model_status(req))
        if request.method != "POST" or verb is None:
            raise NotFoundPath(f"Malformed request: {request.method} {request.path}")
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"JSON Parse error: {exc}") from None
        if verb == "predict":
            spec = predict_pb2.PredictRequest().model_spec
            _spec(m, spec)
            servable = self.core.registry.resolve(spec)
            sig_name = body.get("signature_name", "") if isinstance(body, dict) else ""
            sig = servable.signature(sig_name if isinstance(sig_name, str) else "")
            req, row = predict_request(body, m, {k: s.dtype for k, s in sig.inputs.items()})
            if not req.model_spec.WhichOneof("version_choice"):  # the version whose signature was read
                req.model_spec.version.value = servable.version
            return predict_json(await self.core.predict(req), row)
        if verb == "classify":
            creq = classification_pb2.ClassificationRequest()
            _spec(m, creq.model_spec)
            example_input(body, creq)
            cresp = await self.core.classify(creq)
            return {"results": [[[c.label, _plain(np.float32(c.score), "")] for c in cl.classes]
                                for cl in cresp.result.classifications]}
        rreq = regression_pb2.RegressionRequest()
        _spec(m, rreq.model_spec)
        example_input(body, rreq)
        rresp = await self.core.regress(rreq)
        return {"results": [_plain(np.float32(r.value), "") for r in rresp.result.regressions]}

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

