"""Authenticated principals, so that session identity is not the client's choice.

A verifier turns a bearer token into a principal name (or None when invalid).
Built in: a static token file (one ``<token> <principal>`` per line, ``#``
comments). Any other scheme plugs in as ``module:attribute`` naming a verifier
object or a zero-argument factory returning one (OIDC/JWT validation, an API
key service, ...). mTLS deployments use the client certificate's common name
instead (see ``identity.py``).
"""

from __future__ import annotations

import hmac
import importlib
from pathlib import Path
from typing import Protocol


class TokenVerifier(Protocol):
    def verify(self, token: str) -> str | None: ...


class StaticTokens:
    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise ValueError("token file defines no tokens")
        self._tokens = dict(tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> "StaticTokens":
        tokens = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<token> <principal>'")
            tokens[parts[0]] = parts[1]
        return cls(tokens)

    def verify(self, token: str) -> str | None:
        for known, principal in self._tokens.items():  # constant-time per comparison
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        return None


def load_verifier(tokens_file: str = "", plugin: str = "") -> TokenVerifier | None:
    if tokens_file and plugin:
        raise ValueError("set either an auth token file or an auth verifier plugin, not both")
    if tokens_file:
        return StaticTokens.from_file(tokens_file)
    if plugin:
        module, _, attr = plugin.partition(":")
        obj = getattr(importlib.import_module(module), attr or "verifier")
        verifier = obj() if callable(obj) and not hasattr(obj, "verify") else obj
        if not hasattr(verifier, "verify"):
            raise ValueError(f"{plugin} is not a token verifier (needs .verify(token) -> principal | None)")
        return verifier
    return None
