"""Loaded SavedModels: which versions of which models are served, and lookups.

:class:`ModelRegistry` scans each model's base path (TF Serving's layout,
``<base_path>/<version>/saved_model.pb``), loads the versions its version policy
selects, unloads the others, and resolves a request's ``ModelSpec`` to one
:class:`Servable`. Readers never take a lock: a refresh builds new dicts and
swaps them in.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .config import DEFAULT_SIGNATURE, ModelConfig
from .errors import ModelLoadError, ModelNotFound, SignatureNotFound, VersionNotFound
from .tensors import TensorSpecInfo

log = logging.getLogger("serving")

AVAILABLE = 30  # GetModelStatus ModelVersionStatus.State values
END = 50


def version_dirs(base_path: Path) -> list[int]:
    """Numeric subfolders holding a SavedModel (same rule as ``lab.export.version_dirs``)."""
    if not base_path.is_dir():
        return []
    return sorted(int(p.name) for p in base_path.iterdir()
                  if p.name.isdigit() and ((p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists()))


@dataclass(frozen=True)
class Signature:
    """One callable signature of a servable, with the specs its requests are checked against."""

    name: str
    inputs: Mapping[str, TensorSpecInfo]
    outputs: Mapping[str, TensorSpecInfo]
    fn: Callable = field(repr=False, compare=False)

    @property
    def batchable(self) -> bool:
        """Requests can be concatenated along dim 0 and outputs split back."""
        return (bool(self.inputs) and all(s.batchable for s in self.inputs.values())
                and bool(self.outputs)
                and all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None
                        for s in self.outputs.values()))

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        out = self.fn(**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: np.asarray(v) for k, v in out.items()}


@dataclass(frozen=True)
class Servable:
    """One loaded version of a model."""

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Signature]
    signature_def_map: object = field(repr=False, compare=False)  # get_model_metadata_pb2.SignatureDefMap
    handle: object = field(repr=False, compare=False)  # the tf.saved_model.load result, kept alive

    def signature(self, name: str) -> Signature:
        sig = self.signatures.get(name or DEFAULT_SIGNATURE)
        if sig is None:
            raise SignatureNotFound(
                f"Serving signature key \"{name or DEFAULT_SIGNATURE}\" not found in model "
                f"'{self.name}' version {self.version}; available: {', '.join(sorted(self.signatures)) or 'none'}")
        return sig


def read_signature_defs(path: Path):
    """The SignatureDefs of the ``serve`` MetaGraph, as TF Serving reports them."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    sm = saved_model_pb2.SavedModel()
    if (path / "saved_model.pb").exists():
        sm.ParseFromString((path / "saved_model.pb").read_bytes())
    else:
        text_format.Parse((path / "saved_model.pbtxt").read_text(), sm)
    if not sm.meta_graphs:
        raise ModelLoadError(f"{path}: SavedModel has no MetaGraph")
    mg = next((m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags), sm.meta_graphs[0])
    out = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in mg.signature_def.items():
        out.signature_def[key].CopyFrom(sig)
    return out


def load_servable(name: str, version: int, path: Path, warmup: bool = True) -> Servable:
    """Load one SavedModel version; raises :class:`ModelLoadError`."""
    import tensorflow as tf

    t0 = time.perf_counter()
    try:
        sdm = read_signature_defs(path)
        handle = tf.saved_model.load(str(path))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model '{name}' version {version} from {path}: {exc}") from exc
    sigs: dict[str, Signature] = {}
    for key, fn in handle.signatures.items():
        sd = sdm.signature_def.get(key)
        if sd is None:
            continue
        sigs[key] = Signature(
            name=key,
            inputs={k: TensorSpecInfo.from_tensor_info(v) for k, v in sd.inputs.items()},
            outputs={k: TensorSpecInfo.from_tensor_info(v) for k, v in sd.outputs.items()},
            fn=fn,
        )
    servable = Servable(name, version, path, sigs, sdm, handle)
    if warmup:
        _warmup(servable)
    log.info("Successfully loaded servable version {name: %s version: %d} from %s "
             "(signatures: %s) in %.2f s", name, version, path, ", ".join(sorted(sigs)) or "none",
             time.perf_counter() - t0)
    return servable


def _warmup(servable: Servable) -> None:
    """One call with a zero batch of 1 per batchable numeric signature: first requests stay fast."""
    import tensorflow as tf

    for sig in servable.signatures.values():
        if not sig.batchable:
            continue
        try:
            dtypes = {k: tf.dtypes.as_dtype(s.dtype) for k, s in sig.inputs.items()}
            if not all(d.is_numpy_compatible and (d.is_floating or d.is_integer) for d in dtypes.values()):
                continue
            sig({k: np.zeros((1, *s.shape[1:]), dtypes[k].as_numpy_dtype) for k, s in sig.inputs.items()})
        except Exception as exc:  # a model may reject zeros; serving still works
            log.warning("warm-up of %s version %d signature %s failed: %s",
                        servable.name, servable.version, sig.name, exc)


@dataclass
class RefreshResult:
    loaded: list[tuple[str, int]] = field(default_factory=list)
    unloaded: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


Loader = Callable[[str, int, Path], Servable]


class ModelRegistry:
    def __init__(self, models: Sequence[ModelConfig], loader: Loader = load_servable):
        self._loader = loader
        self._configs: dict[str, ModelConfig] = {m.name: m for m in models}
        self._servables: dict[str, dict[int, Servable]] = {}
        self._ended: dict[str, set[int]] = {}
        self._failed: dict[tuple[str, int], float] = {}  # (name, version) -> saved_model mtime that failed
        self._refresh_lock = threading.Lock()

    # ------------------------------------------------------------ reads (lock-free)
    @property
    def configs(self) -> dict[str, ModelConfig]:
        return dict(self._configs)

    def model_names(self) -> list[str]:
        return sorted(self._configs)

    def versions(self, name: str) -> dict[int, Servable]:
        return dict(self._servables.get(name, {}))

    def resolve(self, model_spec) -> Servable:
        """``ModelSpec`` (name, optional version or version_label) -> a loaded :class:`Servable`."""
        name = model_spec.name
        which = model_spec.WhichOneof("version_choice")
        versions = self._servables.get(name, {})
        if not versions:  # TF Serving's words: a caller learns nothing of the other models
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        loaded = ", ".join(str(v) for v in sorted(versions))
        if which == "version":
            v = model_spec.version.value
            if v not in versions:
                raise VersionNotFound(f"Servable not found for request: Specific({name}, {v}): "
                                      f"version {v} of model '{name}' is not loaded (loaded: {loaded})")
            return versions[v]
        if which == "version_label":
            label = model_spec.version_label
            v = self._configs[name].version_labels.get(label) if name in self._configs else None
            if v is None or v not in versions:
                known = ", ".join(sorted(self._configs[name].version_labels)) or "none"
                raise VersionNotFound(f"Servable not found for request: Labeled({name}, {label}): "
                                      f"unknown version label '{label}' for model '{name}' "
                                      f"(labels: {known}; loaded versions: {loaded})")
            return versions[v]
        return versions[max(versions)]

    def status(self, name: str, version: int | None = None) -> list[tuple[int, int]]:
        """``[(version, state)]`` ascending, state AVAILABLE or END; raises when unknown."""
        versions = self._servables.get(name, {})
        ended = self._ended.get(name, set())
        if not versions and not ended:
            raise ModelNotFound(f"Could not find any versions of model {name}")
        states = {v: END for v in ended} | {v: AVAILABLE for v in versions}
        if version is not None:
            if version not in states:
                raise VersionNotFound(f"Could not find version {version} of model {name}")
            return [(version, states[version])]
        return sorted(states.items())

    # ------------------------------------------------------------ writes
    def set_configs(self, models: Sequence[ModelConfig]) -> None:
        """Replace the model list; takes effect at the next :meth:`refresh`."""
        self._configs = {m.name: m for m in models}

    def refresh(self, strict: bool = False) -> RefreshResult:
        """Load newly selected versions and unload deselected ones.

        ``strict`` (startup, reload): any load failure, or a model left without a
        version, raises :class:`ModelLoadError` and leaves the registry unchanged.
        Otherwise (polling) failures are logged and retried when the files change.
        """
        with self._refresh_lock:
            result = RefreshResult()
            new: dict[str, dict[int, Servable]] = {}
            for name, cfg in self._configs.items():
                current = self._servables.get(name, {})
                wanted = cfg.version_policy.select(version_dirs(cfg.base_path))
                kept: dict[int, Servable] = {}
                for v in wanted:
                    if v in current:
                        kept[v] = current[v]
                        continue
                    path = cfg.base_path / str(v)
                    stamp = _mtime(path)
                    if not strict and self._failed.get((name, v)) == stamp:
                        continue
                    try:
                        kept[v] = self._loader(name, v, path)
                        self._failed.pop((name, v), None)
                        result.loaded.append((name, v))
                    except Exception as exc:
                        msg = str(exc) if isinstance(exc, ModelLoadError) else \
                            f"cannot load model '{name}' version {v} from {path}: {exc}"
                        if strict:
                            raise ModelLoadError(msg) from exc
                        self._failed[(name, v)] = stamp
                        result.errors.append(msg)
                        log.error("%s", msg)
                if not kept and strict:
                    raise ModelLoadError(
                        f"no servable version of model '{name}' under {cfg.base_path} "
                        f"(expected <base_path>/<version>/saved_model.pb; policy {cfg.version_policy.kind})")
                if not kept and current and not wanted:
                    log.warning("model '%s': no version on disk any more under %s; unloading", name, cfg.base_path)
                new[name] = kept
            for name, current in self._servables.items():
                for v in current:
                    if v not in new.get(name, {}):
                        result.unloaded.append((name, v))
                        self._ended.setdefault(name, set()).add(v)
                        log.info("Unloaded servable version {name: %s version: %d}", name, v)
            for name, versions in new.items():
                self._ended.get(name, set()).difference_update(versions)
            self._servables = new
            return result


def _mtime(path: Path) -> float:
    for f in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            return (path / f).stat().st_mtime
        except OSError:
            continue
    return 0.0
