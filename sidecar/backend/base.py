"""The model backend as an interface: what the data plane may ask of a model server.

The data plane sees only ``Backend``: resolve a caller's model reference to the
version that will answer (and its signature), predict on a batch, pass a
metadata/status request through. ``sidecar.backend.tfserving.GrpcBackend`` talks to
TensorFlow Serving; ``sidecar.testing.FakeBackend`` is the one official test double.
Nothing here knows a wire format.

Resolution is cached (``resolve_ttl_s``): "latest", a version label and an
explicit number that name the same served model all resolve to ONE ``ModelKey``
with the served version number, so anchors and the cross-session index cannot
be split by spelling the version differently. A reload to a new version starts
fresh keys once the cache entry expires. Predict calls are pinned to the
resolved version, so the version that answers is the one the keys name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


DEFAULT_SIGNATURE = "serving_default"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"

# Pass-through methods and the service that serves them.
PREDICTION_METHODS = ("GetModelMetadata", "Classify", "Regress", "MultiInference")
MODEL_METHODS = ("GetModelStatus", "HandleReloadConfigRequest")


@dataclass(frozen=True)
class ModelRef:
    """A model as the caller names it: version 0 and no label mean "latest"."""

    name: str
    version: int = 0
    label: str = ""
    signature: str = DEFAULT_SIGNATURE

    @classmethod
    def from_spec(cls, spec) -> "ModelRef":
        """The reference a TF Serving ``ModelSpec`` names (the inverse of ``spec_into``)."""
        which = spec.WhichOneof("version_choice")
        return cls(spec.name, spec.version.value if which == "version" else 0,
                   spec.version_label if which == "version_label" else "", spec.signature_name or DEFAULT_SIGNATURE)

    def spec_into(self, spec) -> None:
        """Fill a TF Serving ``ModelSpec`` with this reference."""
        spec.name = self.name
        if self.label:
            spec.version_label = self.label
        elif self.version:
            spec.version.value = self.version
        if self.signature:
            spec.signature_name = self.signature


@dataclass(frozen=True)
class ModelKey:
    """A model as it is SERVED: the version number that answers."""

    name: str
    version: int = 0  # 0 only when the backend does not report versions
    signature: str = DEFAULT_SIGNATURE


@dataclass(frozen=True)
class Signature:
    input_name: str
    input_shape: tuple[int | None, ...]  # per image, without the batch dimension
    output_name: str
    num_classes: int | None = None


@dataclass(frozen=True)
class Served:
    key: ModelKey
    signature: Signature


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # float32 [num_classes]
    version: int

    @property
    def label(self) -> int:
        return int(np.argmax(self.scores))


class Connectivity(Protocol):
    """What health watching needs from a backend's connection (a ``grpc.aio.Channel`` has it;
    states are ``grpc.ChannelConnectivity`` values)."""

    def get_state(self, try_to_connect: bool = False) -> Any: ...

    async def wait_for_state_change(self, last_observed_state: Any) -> None: ...


class Backend(Protocol):
    """What the data plane and the server need from a model server."""

    @property
    def timeout_s(self) -> float: ...

    @property
    def channel(self) -> Connectivity: ...

    async def resolve(self, ref: ModelRef) -> Served:
        """The served version and signature for ``ref`` (NotFound if none); cached."""

    async def predict(self, key: ModelKey, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """Scores [n, classes] of ``batch`` and the version that answered."""

    async def passthrough(self, method: str, request: Any) -> Any:
        """Forward a metadata/status (or operator-allowed) request unchanged."""

    def forget(self, ref: ModelRef | None = None) -> None:
        """Drop cached resolutions (all, or those of ``ref``'s model)."""

    async def close(self) -> None: ...


class ResolutionCache:
    """ModelRef -> (Served, when); one dict lookup on the hot path."""

    def __init__(self, ttl_s: float, clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[ModelRef, tuple[float, Served]] = {}

    def get(self, ref: ModelRef) -> Served | None:
        hit = self._entries.get(ref)
        if hit is None or self.clock() - hit[0] >= self.ttl_s:
            return None
        return hit[1]

    def put(self, ref: ModelRef, served: Served) -> None:
        if len(self._entries) > 4096:  # callers choose refs: keep the cache bounded
            self._entries.clear()
        self._entries[ref] = (self.clock(), served)

    def forget(self, name: str | None = None) -> None:
        if name is None:
            self._entries.clear()
        else:
            for ref in [r for r in self._entries if r.name == name]:
                del self._entries[ref]
