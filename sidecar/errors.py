"""Errors of the data plane, and the ONE table that maps them to gRPC and HTTP.

The data plane and its helpers raise plain exceptions; no module but this one
knows a status code. Transports call ``status_of`` (gRPC) or ``http_status_of``
(REST) exactly once per failed call.

    HashguardError
    ├── InvalidInput        bad request content            INVALID_ARGUMENT   400
    ├── NotFound            unknown model/version/sig.     NOT_FOUND          404
    ├── TooLarge            too many images / too big      RESOURCE_EXHAUSTED 413
    ├── Unauthenticated     missing or invalid credential  UNAUTHENTICATED    401
    ├── Refused             method disabled by policy      FAILED_PRECONDITION 412
    ├── BackendUnavailable  model backend unreachable      UNAVAILABLE        503
    ├── StoreUnavailable    session store unusable         UNAVAILABLE        503
    ├── BackendTimeout      model backend too slow         DEADLINE_EXCEEDED  504
    ├── SlowClient          request body not received in   DEADLINE_EXCEEDED  408
    │                       time (--http-body-timeout-s)
    ├── Abandoned           the client's deadline passed   DEADLINE_EXCEEDED  504
    │                       or it cancelled: not forwarded (CANCELLED         499)
    └── BackendError        any other backend status       (passed on)        (TF Serving's map)

HTTP codes follow TF Serving's REST server (``ToHTTPStatusCode``), except that
an oversize request is 413 (the body limit) rather than 429 and a body that
does not arrive in time is 408.

A backend's NOT_FOUND is NEVER passed on as the backend wrote it (a model
server may list the models it serves, ``python -m serving`` did): the client
gets ``Servable not found for request: ...`` naming only what it asked for
(``not_found``).
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable

import grpc

C = grpc.StatusCode


class HashguardError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(HashguardError):
    pass


class NotFound(HashguardError):
    pass


class TooLarge(HashguardError):
    pass


class Unauthenticated(HashguardError):
    pass


class Refused(HashguardError):
    """A method the deployment does not serve (e.g. an unjudged pass-through)."""


class BackendUnavailable(HashguardError):
    pass


class StoreUnavailable(HashguardError):
    """The shared session store could not be used; the call is not judged, not forwarded."""


class BackendTimeout(HashguardError):
    pass


class SlowClient(HashguardError):
    """The request (its body) did not arrive within the read timeout."""


class Abandoned(HashguardError):
    """The caller gave up (deadline passed, cancelled, disconnected) before the call
    was forwarded; nothing was sent to the model and no session changed."""

    def __init__(self, message: str, cancelled: bool = False) -> None:
        super().__init__(message)
        if cancelled:
            self.code = C.CANCELLED


class BackendError(HashguardError):
    """The backend answered with a status we pass on as it is."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# The table: exception class -> gRPC status. Looked up along the class's MRO.
GRPC_STATUS: dict[type, grpc.StatusCode] = {
    InvalidInput: C.INVALID_ARGUMENT,
    NotFound: C.NOT_FOUND,
    TooLarge: C.RESOURCE_EXHAUSTED,
    Unauthenticated: C.UNAUTHENTICATED,
    Refused: C.FAILED_PRECONDITION,
    BackendUnavailable: C.UNAVAILABLE,
    StoreUnavailable: C.UNAVAILABLE,
    BackendTimeout: C.DEADLINE_EXCEEDED,
    SlowClient: C.DEADLINE_EXCEEDED,
    Abandoned: C.DEADLINE_EXCEEDED,
}

# gRPC status -> HTTP status, as TF Serving's REST API answers them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    C.OK: 200, C.CANCELLED: 499, C.UNKNOWN: 500, C.INVALID_ARGUMENT: 400, C.DEADLINE_EXCEEDED: 504,
    C.NOT_FOUND: 404, C.ALREADY_EXISTS: 409, C.PERMISSION_DENIED: 403, C.RESOURCE_EXHAUSTED: 429,
    C.FAILED_PRECONDITION: 412, C.ABORTED: 409, C.OUT_OF_RANGE: 403, C.UNIMPLEMENTED: 501,
    C.INTERNAL: 500, C.UNAVAILABLE: 503, C.DATA_LOSS: 500, C.UNAUTHENTICATED: 401,
}
HTTP_OVERRIDE: dict[type, int] = {TooLarge: 413, SlowClient: 408}


def not_found(spec=None) -> NotFound:
    """NOT_FOUND in TF Serving's words, naming only what the caller asked for
    (``spec``: a TF Serving ModelSpec or a ``ModelRef``); never the backend's
    text, which may list the models it serves."""
    if spec is None:
        return NotFound("Servable not found for request")
    name = getattr(spec, "name", "")
    label = getattr(spec, "version_label", None) or getattr(spec, "label", "")
    version = getattr(spec, "version", 0)
    version = getattr(version, "value", version)
    if label:
        which = f"Labeled({name}, {label})"
    elif version:
        which = f"Specific({name}, {version})"
    else:
        which = f"Latest({name})"
    return NotFound(f"Servable not found for request: {which}")


def from_backend(err: grpc.aio.AioRpcError | grpc.RpcError, spec=None) -> HashguardError:
    """A backend's status as ours; ``spec``: the model the call asked for (NOT_FOUND names it)."""
    code = err.code()
    detail = err.details() or ""
    if code == C.UNAVAILABLE:
        return BackendUnavailable(f"model backend unavailable: {detail}")
    if code == C.DEADLINE_EXCEEDED:
        return BackendTimeout(f"model backend did not answer in time: {detail}")
    if code == C.NOT_FOUND:
        return not_found(spec)
    if code == C.INVALID_ARGUMENT:
        return InvalidInput(f"model backend: {detail}")
    return BackendError(code, f"model backend: {detail}")


def _lookup(table: dict, exc: BaseException):
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (gRPC status, message); unexpected ones are INTERNAL."""
    if isinstance(exc, grpc.aio.AioRpcError):
        exc = from_backend(exc)
    if isinstance(exc, HashguardError):
        code = getattr(exc, "code", None) if isinstance(getattr(exc, "code", None), grpc.StatusCode) else None
        return code or _lookup(GRPC_STATUS, exc) or C.INTERNAL, exc.message
    return C.INTERNAL, f"internal error: {type(exc).__name__}"


def release(exc: BaseException) -> None:
    """Once an error is mapped and logged: clear the locals of every finished frame
    its traceback (and those of its causes) holds, and drop the traceback. A failed
    request then keeps no pixels or tensors alive, even where an exception ends up
    in a reference cycle that only a full garbage collection would free."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        current = current.__cause__ or current.__context__


def report(exc: BaseException, method: str, count: Callable[[str, str], object], log: logging.Logger,
           **where: object) -> tuple[grpc.StatusCode, str]:
    """Every failed call, of either transport, once: map it, count it (``count(method,
    status name)``), log it (INTERNAL with its traceback, at ERROR; the rest at INFO) and
    release its frames. Returns (gRPC status, message)."""
    code, message = status_of(exc)
    count(method, code.name)
    internal = code == C.INTERNAL
    log.log(logging.ERROR if internal else logging.INFO, "call failed",
            extra={"method": method, "code": code.name, "detail": message, **where}, exc_info=exc if internal else None)
    release(exc)  # the failed call's arrays go now, not at the next full GC
    return code, message


def http_status_of(exc: BaseException) -> tuple[int, str]:
    """Map any exception to (HTTP status, message) with TF Serving's codes."""
    code, message = status_of(exc)
    return _lookup(HTTP_OVERRIDE, exc) or HTTP_STATUS.get(code, 500), message
