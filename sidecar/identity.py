"""Who is asking: the session a call belongs to.

Order: the request's ``session_id`` field, then the ``x-session-id`` metadata
key (name configurable), then (unless sessions are required) the peer's
address without its port, so that one client host is one session.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInput


@dataclass(frozen=True)
class IdentityPolicy:
    header: str = "x-session-id"
    require: bool = False
    max_len: int = 256


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:5123' -> 'ipv4:10.0.0.5'; 'ipv6:[::1]:5123' -> 'ipv6:[::1]'."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, _, port = peer.rpartition(":")
        return head if port.isdigit() else peer
    return peer


def resolve_session(policy: IdentityPolicy, field_value: str, metadata: dict[str, str], peer: str) -> str:
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
