"""REST adapter: TensorFlow Serving's REST API (v1) over the same data plane.

    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict
         {"instances": [...]}  row format      -> {"predictions": [...]}
         {"inputs": ...}       columnar format -> {"outputs": ...}
         an image is a nested [h][w][c] list of numbers (0..255), or
         {"b64": "<base64 PNG/JPEG>"}; ``signature_name`` is optional
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   model metadata

Authentication is the data plane's (``Authorization: Bearer <token>``); the
session is the principal, else the ``X-Session-Id`` header (name from
``--session-header``), else the peer address. Errors are ``{"error": "..."}``
with TF Serving's HTTP codes (``errors.http_status_of``); a body larger than
the limit is 413. Served by aiohttp in the sidecar's own event loop
(``benchmarks/bench_http.py`` measured it against starlette+uvicorn).

Bounded against hostile clients: a connection must send its request head
within ``--http-idle-timeout-s`` of opening (or of its last answer) and its
body within ``--http-body-timeout-s`` (else 408 and the connection closes);
connections are capped (``sidecar.transport.connections``). A body is
inflated (gzip/deflate, bounded) only after authentication and off the event
loop, and measured before it is parsed (``sidecar.wire.jsonbody``): depth,
number lengths and the instance count against ``--max-batch``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import multiprocessing
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from ..backend.base import DEFAULT_SIGNATURE, ModelRef
from ..plane.dataplane import DataPlane, ImageCall
from ..errors import BackendUnavailable, InvalidInput, NotFound, SlowClient, TooLarge, http_status_of, report
from ..plane.identity import Caller
from ..wire import jsonbody
from ..wire.images import WireImages
from .connections import CappedConnections
from ..wire.tfapi import get_model_metadata_pb2, get_model_status_pb2

log = logging.getLogger("hashguard.rest")
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
INLINE_BODY_BYTES = 64 << 10  # bodies up to this size are measured on the event loop (well under 10 ms)
# larger ones are inflated and measured here: ONE thread, so bodies are worked on one at a
# time (bounded memory) and their buffers come from one malloc arena, not one per thread
_BODY_POOL = ThreadPoolExecutor(1, thread_name_prefix="hashguard-body")
# and parsed (json.loads, lists to arrays) in ONE separate process: the GIL stays free for
# the event loop, and the parse's Python objects live and die there, not in the sidecar
_PARSE_POOL: ProcessPoolExecutor | None = None


def _parse_pool() -> ProcessPoolExecutor:
    global _PARSE_POOL
    if _PARSE_POOL is None:
        _PARSE_POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return _PARSE_POOL


def shutdown_parse_pool() -> None:
    """Stop the parse process (the process is leaving: an idle pool left to the
    interpreter's exit hooks kept --workers processes from exiting on SIGTERM)."""
    global _PARSE_POOL
    if _PARSE_POOL is not None:
        _PARSE_POOL.shutdown(wait=True, cancel_futures=True)
        _PARSE_POOL = None


def _warm() -> None:
    """Nothing: submitted once at start so the parse process exists before the first large body."""

_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>\w+)|/(?P<metadata>metadata))?$")


def parse_path(tail: str) -> tuple[ModelRef, str | None, bool]:
    """'cnn/versions/2:predict' -> (ModelRef('cnn', 2), 'predict', False)."""
    m = _PATH.match(tail)
    if not m:
        raise NotFound(f"no such resource: /v1/models/{tail}")
    version = int(m["version"]) if m["version"] else 0
    if m["version"] and not 0 < version < 2**63:
        raise InvalidInput(f"version must be a positive number, got {m['version']}")
    return ModelRef(m["name"], version, m["label"] or ""), m["verb"], bool(m["metadata"])


def _b64(value: dict, what: str) -> bytes:
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InvalidInput(f"{what}: an encoded image is {{\"b64\": \"<base64 PNG/JPEG>\"}}")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what}: b64 value is not valid base64") from None


def _image(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(f"{what}: an image is a [height][width][channels] list of numbers") from None
    if arr.ndim != 3:
        raise InvalidInput(f"{what}: expected [height][width][channels], got shape {list(arr.shape)}")
    return arr


def _named(value, input_name: str | None):
    """A value that may name its input ({"image": x}); returns (name or None, x)."""
    if isinstance(value, dict) and "b64" not in value:
        if len(value) != 1:
            raise InvalidInput(f"hashguard judges single-input image models; got inputs {sorted(value)}")
        (name, x), = value.items()
        if input_name is not None and name != input_name:
            raise InvalidInput(f"every instance must name the same input; got {input_name!r} and {name!r}")
        return name, x
    return input_name, value


@dataclass(frozen=True)
class PredictBody:
    """What a predict body says, apart from who sent it and to which model."""

    signature: str
    row: bool
    input_name: str | None
    images: list  # np.ndarray each, or the encoded bytes of each
    encoded: bool


def predict_call(body, ref: ModelRef, caller: Caller) -> tuple[ImageCall, bool]:
    """A TF Serving REST predict body (parsed JSON, or its ``PredictBody``) -> (ImageCall, row format?)."""
    parts = body if isinstance(body, PredictBody) else predict_body(body)
    ref = ModelRef(ref.name, ref.version, ref.label, parts.signature)
    images: Any = WireImages(parts.images) if parts.encoded else parts.images  # WireImages: decoded by the plane
    return ImageCall("rest:predict", ref, images, caller, input_name=parts.input_name), parts.row


def parse_predict(body: bytes) -> PredictBody:
    """JSON bytes (already measured by ``jsonbody.check``) -> ``PredictBody``. Runs in the
    parse process for large bodies: json.loads and the lists-to-arrays conversion hold the
    GIL for about 0.2 s per MiB, which on the event loop would stall every other call."""
    return predict_body(jsonbody.loads(body))


def predict_body(body) -> PredictBody:
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with 'instances' or 'inputs'")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput("request body must have exactly one of 'instances' (row) or 'inputs' (columnar)")
    sig = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(sig, str) or not sig:
        raise InvalidInput("signature_name must be a non-empty string")
    row = "instances" in body
    name = None
    if row:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidInput("'instances' must be a list")
        items = []
        for inst in instances:
            name, x = _named(inst, name)
            items.append(x)
    else:
        name, items = _named(body["inputs"], None)
        if not isinstance(items, list):
            raise InvalidInput("'inputs' must be a list of images (or {input_name: list})")
    encoded = [isinstance(x, dict) for x in items]
    if any(encoded):  # PNG/JPEG: decoded by the data plane once the model's shape is known
        if not all(encoded):
            raise InvalidInput("instances must be all {\"b64\": ...} images or all pixel arrays, not both")
        return PredictBody(sig, row, name, [_b64(x, f"image {i}") for i, x in enumerate(items)], True)
    return PredictBody(sig, row, name, [_image(x, f"image {i}") for i, x in enumerate(items)], False)


def _tf_json(msg) -> dict:
    """A proto as TF Serving's REST API prints it: proto field names, fields with default values too
    (``"status": {"error_code": "OK", "error_message": ""}``, ``"signature_name": ""``)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def error(exc: BaseException) -> web.Response:
    code, message = http_status_of(exc)
    return web.json_response({"error": message}, status=code)


class RestAdapter:
    def __init__(self, plane: DataPlane, max_body_bytes: int, idle_timeout_s: float = 15.0,
                 body_timeout_s: float = 30.0, max_connections: int = 10000) -> None:
        self.plane = plane
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        self.app.router.add_route("*", "/v1/models/{tail:.+}", self.models)
        self._runner: web.AppRunner | None = None
        self.connections: CappedConnections | None = None
        self.port: int | None = None

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        # the HTTP method is the client's word: only standard ones become label values
        method = f"rest:{request.method if request.method in _METHODS else 'other'}"
        if self.connections is not None:
            self.connections.busy(request.protocol)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            exc: BaseException = TooLarge(f"request body is larger than the limit of {self.max_body_bytes} bytes")
        except web.HTTPException as http:  # aiohttp's own (405, 404 of unknown paths)
            return web.json_response({"error": http.reason}, status=http.status)
        except Exception as e:  # noqa: BLE001 - the single mapping point for REST
            exc = e
        finally:
            if self.connections is not None:
                self.connections.idle(request.protocol)
        report(exc, method, self._count, log, path=request.path)
        response = error(exc)
        if isinstance(exc, SlowClient):
            response.force_close()  # the rest of its body may still be on the way
        return response

    def _count(self, method: str, code: str) -> None:
        self.plane.metrics.errors.labels(method, code).inc()

    def _caller(self, request: web.Request) -> Caller:
        identity = self.plane.identity
        certs = ()
        if identity.client_certs:
            peercert = request.transport.get_extra_info("peercert") if request.transport else None
            certs = tuple(v for rdn in (peercert or {}).get("subject", ()) for k, v in rdn if k == "commonName")
        principal = self.plane.authenticate(request.headers.get("Authorization", ""), certs)
        transport = request.transport
        return Caller(principal, request.headers.get(identity.header, ""), request.remote or "unknown",
                      gone=lambda: "" if transport is not None and not transport.is_closing() else "cancelled")

    async def models(self, request: web.Request) -> web.Response:
        caller = self._caller(request)  # authentication before routing
        ref, verb, metadata = parse_path(request.match_info["tail"])
        self.plane.check_model_name(ref.name)  # before the body is read
        if request.method == "POST" and verb == "predict":
            try:
                call, row = predict_call(await self._json(request), ref, caller)
            except InvalidInput:  # an unknown model is NOT_FOUND before any input check, as in TF Serving
                await self.plane.require_model(ref)
                raise
            out = await self.plane.infer(call)
            scores = out.dense().tolist()
            return web.json_response({"predictions": scores} if row else {"outputs": scores})
        if request.method == "GET" and verb is None:
            return web.json_response(await self._status(ref, metadata))
        if verb in ("classify", "regress"):
            self.plane.check_allowed(verb.capitalize())  # refused unless allowed
            raise InvalidInput(f":{verb} is not served over REST by hashguard; use gRPC")
        raise NotFound(f"no such resource: {request.method} {request.path}")

    async def _json(self, request: web.Request) -> PredictBody:
        """The body, read within the body timeout, inflated (bounded) and measured
        (bounded) before it is parsed; large bodies are inflated and measured in a
        thread (zlib and numpy release the GIL) and parsed in the parse process."""
        try:
            raw = await asyncio.wait_for(self._read(request), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise SlowClient(f"request body not received within {self.body_timeout_s:g} s") from None
        encoding = request.headers.get("Content-Encoding", "")

        def bounded(data: bytearray) -> bytes | bytearray:
            body = jsonbody.inflate(data, encoding, self.max_body_bytes)
            jsonbody.check(body, self.plane.settings.max_batch)
            return body

        if len(raw) <= INLINE_BODY_BYTES and encoding.strip().lower() in ("", "identity"):
            return predict_body(jsonbody.loads(bounded(raw)))
        loop = asyncio.get_running_loop()
        body = bytes(await loop.run_in_executor(_BODY_POOL, bounded, raw))
        del raw
        global _PARSE_POOL
        try:
            return await loop.run_in_executor(_parse_pool(), parse_predict, body)
        except BrokenProcessPool:
            _PARSE_POOL = None  # a new process for the next body
            raise BackendUnavailable("the request-parsing process stopped; try again") from None

    async def _read(self, request: web.Request) -> bytearray:
        """The body into ONE buffer (``request.read()`` holds it twice), at most the limit."""
        limit = self.max_body_bytes
        too_large = TooLarge(f"request body is larger than the limit of {limit} bytes")
        length = request.content_length
        if length is not None and length > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.content.iter_any():
            if len(body) + len(chunk) > limit:
                raise too_large
            body += chunk
        return body

    async def _status(self, ref: ModelRef, metadata: bool) -> dict:
        if metadata:
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            ref.spec_into(req.model_spec)
            req.model_spec.ClearField("signature_name")
            resp = await self.plane.passthrough("GetModelMetadata", req)
            out = {"model_spec": _tf_json(resp.model_spec), "metadata": {}}
            for key, anyval in resp.metadata.items():
                sig_map = get_model_metadata_pb2.SignatureDefMap()
                anyval.Unpack(sig_map)
                out["metadata"][key] = _tf_json(sig_map)
            return out
        req = get_model_status_pb2.GetModelStatusRequest()
        ref.spec_into(req.model_spec)
        req.model_spec.ClearField("signature_name")
        resp = await self.plane.passthrough("GetModelStatus", req)
        return _tf_json(resp)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        """``reuse_port``: the --workers N processes share the port (sidecar/workers.py)."""
        # keepalive_timeout runs from the moment a connection opens and from each answer:
        # a connection that has not sent a complete request head by then is closed.
        # auto_decompress=False: a compressed body is inflated by _json, bounded, after authentication.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.idle_timeout_s, auto_decompress=False)
        await self._runner.setup()
        self.connections = CappedConnections(self._runner.server, self.max_connections)
        _parse_pool().submit(_warm)  # start the parse process now, not on the first large body
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port (port 0 picks one)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
