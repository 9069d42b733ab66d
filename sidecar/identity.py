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

from dataclasses import dataclass

from .auth import TokenVerifier
from .errors import InvalidInput, Unauthenticated


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


def _bearer(metadata: dict[str, str]) -> str:
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
    return token.strip()


def resolve_session(policy: IdentityPolicy, field_value: str, metadata: dict[str, str], peer: str,
                    auth_context: dict | None = None) -> str:
    if policy.client_certs:
        names = (auth_context or {}).get("x509_common_name") or []
        if not names:
            raise Unauthenticated("a client certificate is required")
        name = names[0]
        return "c:" + (name.decode() if isinstance(name, bytes) else str(name))
    if policy.verifier is not None:
        principal = policy.verifier.verify(_bearer(metadata))
        if not principal:
            raise Unauthenticated("invalid or expired token")
        return "u:" + principal
    value = field_value or metadata.get(policy.header.lower(), "")
    if value:
        if len(value) > policy.max_len:
            raise InvalidInput(f"session id is {len(value)} characters; at most {policy.max_len} allowed")
        if not value.isprintable():
            raise InvalidInput("session id must be printable text")
        return "s:" + value
    if policy.require:
        raise InvalidInput(f"no session id: set the {policy.header!r} metadata key or the request's session_id")
    return "p:" + peer_host(peer or "unknown")
