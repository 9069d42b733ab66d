"""Errors of the data plane and the one place they become gRPC statuses."""

from __future__ import annotations

import grpc


class HashguardError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(HashguardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HashguardError):
    code = grpc.StatusCode.NOT_FOUND


class TooLarge(HashguardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(HashguardError):
    code = grpc.StatusCode.UNAUTHENTICATED


class BackendUnavailable(HashguardError):
    code = grpc.StatusCode.UNAVAILABLE


class BackendTimeout(HashguardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendError(HashguardError):
    """The backend answered with a status we pass on as it is."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def from_backend(err: grpc.aio.AioRpcError | grpc.RpcError) -> HashguardError:
    code = err.code()
    detail = err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(f"model backend unavailable: {detail}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(f"model backend did not answer in time: {detail}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(detail)
    return BackendError(code, f"model backend: {detail}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (status, message); unexpected ones are INTERNAL."""
    if isinstance(exc, HashguardError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        mapped = from_backend(exc)
        return mapped.code, mapped.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
