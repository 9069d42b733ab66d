"""Serving errors and the one place where they become gRPC status codes.

The core (registry, codec, batcher, :mod:`serving.core`) raises these plain
exceptions and knows nothing about gRPC; the servicers are thin adapters that
call :func:`grpc_status` on whatever escapes and abort the RPC with it.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base class: a request the server understood but cannot serve."""


class ModelNotFound(ServingError):
    """No model with that name is configured or none of its versions is loaded."""


class VersionNotFound(ServingError):
    """The model exists but the requested version (or version label) is not loaded."""


class SignatureNotFound(ServingError):
    """The servable has no signature with the requested name."""


class InvalidRequest(ServingError):
    """Malformed request: wrong input names, dtype, shape, undecodable tensor, bad field."""


class Unimplemented(ServingError):
    """An API or method name this server does not provide."""


class FailedPrecondition(ServingError):
    """The request is well-formed but the model cannot answer it that way."""


class ModelLoadError(ServingError):
    """A SavedModel could not be loaded (startup fails fast on this)."""


class ConfigError(ValueError):
    """Invalid server or model configuration (flags, model config file)."""


_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionNotFound, grpc.StatusCode.NOT_FOUND),
    (SignatureNotFound, grpc.StatusCode.FAILED_PRECONDITION),  # TF Serving's code for it
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
)


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to ``(status code, human message)``.

    Known serving errors keep their message; TensorFlow's own
    ``InvalidArgumentError`` (raised by a model on bad input that passed our
    checks) is INVALID_ARGUMENT; anything else is INTERNAL.
    """
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    if type(exc).__name__ == "InvalidArgumentError":  # tf.errors.InvalidArgumentError, without importing TF
        return grpc.StatusCode.INVALID_ARGUMENT, getattr(exc, "message", None) or str(exc)
    code = getattr(exc, "error_code", None)  # any other tf.errors.OpError: its code is gRPC's
    if isinstance(code, int) and type(exc).__name__.endswith("Error"):
        for status in grpc.StatusCode:
            if status.value[0] == code and status != grpc.StatusCode.OK:
                return status, getattr(exc, "message", None) or str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
