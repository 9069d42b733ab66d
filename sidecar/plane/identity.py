"""Who is asking: the session a call belongs to.

Authenticated deployments (a token verifier, or mTLS with client certificates)
derive the session from the principal alone; a client-chosen session id is
ignored there, so an attacker cannot open a fresh session per query. A missing
or invalid credential is ``UNAUTHENTICATED``.

Open (development) deployments take the request's ``session_id`` field, then
the ``x-session-id`` metadata key (name configurable), then, unless sessions
are required, the peer's address without its port: one client host is one
session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .auth import TokenVerifier
from ..errors import InvalidInput, Unauthenticated


@dataclass(frozen=True)
class IdentityPolicy:
    header: str = "x-session-id"
    require: bool = False
    max_len: int = 256
    verifier: TokenVerifier | None = None
    client_certs: bool = False  # mTLS: the certificate's common name is the principal


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:5123' -> 'ipv4:10.0.0.5'; 'ipv6:[::1]:5123' -> 'ipv6:[::1]'."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, _, port = peer.rpartition(":")
        return head if port.isdigit() else peer
    return peer


@dataclass(frozen=True)
class Caller:
    """Who sent a call, as a transport saw it: set once per call, before routing."""

    principal: str | None = None  # "u:<name>" (token) or "c:<CN>" (mTLS); None on open deployments
    session_hint: str = ""  # the session id header/metadata value, if any
    peer: str = "unknown"
    # "" while the caller waits; "deadline" or "cancelled" (also: disconnected) once it has
    # given up: the data plane then forwards nothing for it (``Abandoned``). None: cannot tell
    gone: Callable[[], str] | None = field(default=None, compare=False, repr=False)


def bearer_token(authorization: str) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
    return token.strip()


def authenticate(policy: IdentityPolicy, authorization: str = "", cert_names=()) -> str | None:
    """The caller's principal, or None on an open deployment; Unauthenticated
    when the deployment requires a credential and this one is missing or bad."""
    if policy.client_certs:
        if not cert_names:
            raise Unauthenticated("a client certificate is required")
        name = cert_names[0]
        return "c:" + (name.decode() if isinstance(name, bytes) else str(name))
    if policy.verifier is not None:
        principal = policy.verifier.verify(bearer_token(authorization))
        if not principal:
            raise Unauthenticated("invalid or expired token")
        return "u:" + principal
    return None


def session_for(policy: IdentityPolicy, caller: Caller, field_value: str = "") -> str:
    """The session a call is judged in: the principal when there is one, else
    the client's session id, else (unless required) the peer host."""
    if caller.principal:
        return caller.principal
    value = field_value or caller.session_hint
    if value:
        if len(value) > policy.max_len:
            raise InvalidInput(f"session id is {len(value)} characters; at most {policy.max_len} allowed")
        if not value.isprintable():
            raise InvalidInput("session id must be printable text")
        return "s:" + value
    if policy.require:
        raise InvalidInput(f"no session id: set the {policy.header!r} metadata key or the request's session_id")
    return "p:" + peer_host(caller.peer or "unknown")


def principal_for(caller: Caller) -> str:
    """Whose budget a call spends (hardened mode's near-duplicate budget): the
    authenticated principal, else the client's address without its port. On an open
    deployment every session of one host is one principal, so opening a fresh session
    per query buys nothing; users behind one address share a budget (and are told,
    over budget, the answer to their address's own nearest earlier query)."""
    return caller.principal or "p:" + peer_host(caller.peer or "unknown")

