"""Which TF Serving methods the sidecar passes to the model without judging them.

The one definition, read by the data plane (what it allows) and by the settings
(what ``--passthrough`` accepts). No imports: the CLI reads it before the gRPC stack.
"""

from __future__ import annotations

# Pass-through methods that never judge: always open (after authentication).
OPEN_METHODS = frozenset({"GetModelMetadata", "GetModelStatus"})
# Methods that make the model compute on caller input UNJUDGED: refused unless
# named in --passthrough (flag value -> backend method).
UNPROTECTED = {"classify": "Classify", "regress": "Regress", "multi_inference": "MultiInference",
               "reload_config": "HandleReloadConfigRequest"}


def check_passthrough(methods: frozenset[str]) -> frozenset[str]:
    """``methods`` when every one is a key of UNPROTECTED; ValueError names the unknown."""
    unknown = methods - set(UNPROTECTED)
    if unknown:
        raise ValueError(f"--passthrough: unknown {sorted(unknown)}; choose from {', '.join(UNPROTECTED)}")
    return methods


def parse_passthrough(text: str) -> frozenset[str]:
    """``--passthrough`` (a comma list of UNPROTECTED's keys) as a checked set."""
    return check_passthrough(frozenset(m.strip() for m in text.split(",") if m.strip()))
