"""Loaded SavedModels: which versions of which models are served, and lookups.

:class:`ModelRegistry` scans each model's base path (TF Serving's layout,
``<base_path>/<version>/saved_model.pb``), loads the versions its version policy
selects, unloads the others, and resolves a request's ``ModelSpec`` to one
:class:`Servable`. Readers never take a lock: a refresh builds new dicts and
swaps them in.
"""

from __future__ import annotations

import functools
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


MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
TFLITE_FILE = "model.tflite"


def version_paths(base_path: Path, tflite: bool = False) -> dict[int, Path]:
    """``{version: folder}`` of the subfolders holding a SavedModel (or, with ``tflite``, a model.tflite).

    A folder is a version when its whole name is a number, as in TF Serving:
    ``123`` and ``00000123`` are both version 123 (TF Serving's own test models
    and many deployments pad the number). When two folders name the same
    version, the first in name order wins.
    """
    if not base_path.is_dir():
        return {}
    files = MODEL_FILES + ((TFLITE_FILE,) if tflite else ())
    found: dict[int, Path] = {}
    for p in sorted(base_path.iterdir()):
        if p.name.isdigit() and p.name.isascii() and any((p / f).exists() for f in files):
            found.setdefault(int(p.name), p)
    return found


def version_dirs(base_path: Path) -> list[int]:
    """The versions under a base path, ascending (see :func:`version_paths`)."""
    return sorted(version_paths(base_path))


INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF2 SavedModels' init "signature": not callable


@dataclass(frozen=True)
class Signature:
    """One callable signature of a servable, with the specs its requests are checked against.

    ``fn(inputs, output_aliases)`` runs the graph: TF Serving feeds a signature's
    input tensors and fetches its outputs in the SavedModel's session, so the
    graph, not the SignatureDef's declared shapes, decides which shapes it takes.
    """

    name: str
    inputs: Mapping[str, TensorSpecInfo]
    outputs: Mapping[str, TensorSpecInfo]
    fn: Callable = field(repr=False, compare=False)
    method_name: str = ""

    @property
    def batchable(self) -> bool:
        """Requests can be concatenated along dim 0 and outputs split back."""
        return (bool(self.inputs) and all(s.batchable for s in self.inputs.values())
                and bool(self.outputs)
                and all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None
                        for s in self.outputs.values()))

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self.fn(inputs, tuple(outputs) if outputs is not None else tuple(sorted(self.outputs)))

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(inputs)


_OP_LIBRARIES: list[str] | None = None


def _trace(name: str):
    """A TraceMe annotation: shows in a profile captured through the profiler service
    (serving/profiler.py); costs a flag check when no profile is being taken."""
    from tensorflow.python.profiler.trace import Trace

    return Trace(name)


def load_op_libraries() -> list[str]:
    """Register the custom ops of the op libraries installed here (TF Text), once.

    TF Serving links TF Text's ops into its binary; here, importing
    ``tensorflow_text`` registers them with this process's TensorFlow, so graphs
    that use them import. Returns the libraries loaded.
    """
    global _OP_LIBRARIES
    if _OP_LIBRARIES is None:
        import importlib

        loaded = []
        for module in ("tensorflow_text",):
            try:
                importlib.import_module(module)
            except ImportError:
                continue
            loaded.append(module)
        _OP_LIBRARIES = loaded
        if loaded:
            log.info("custom ops registered from: %s", ", ".join(loaded))
    return _OP_LIBRARIES


class SessionRunner:
    """A SavedModel's MetaGraph in a ``tf.compat.v1.Session``: what TF Serving runs.

    TF1 and TF2 SavedModels alike: the loader restores the variables and runs
    the init op (legacy_init_op / main_op / ``__saved_model_init_op``); a call
    feeds tensors by name and fetches by name through a cached callable, which,
    like TF Serving's ``Session::Run``, does not check feeds against the
    placeholders' static shapes. ``Session.run`` is thread-safe.
    """

    def __init__(self, path: Path, tags: Sequence[str] = ("serve",)):
        import tensorflow as tf

        load_op_libraries()
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            self.meta_graph = tf.compat.v1.saved_model.loader.load(self.session, list(tags), str(path))
        self._callables: dict[tuple[tuple[str, ...], tuple[str, ...]], Callable] = {}
        self._lock = threading.Lock()

    def callable_for(self, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Callable:
        key = (feeds, fetches)
        fn = self._callables.get(key)
        if fn is None:
            from tensorflow.core.protobuf import config_pb2

            with self._lock:
                fn = self._callables.get(key)
                if fn is None:
                    opts = config_pb2.CallableOptions(feed=list(feeds), fetch=list(fetches))
                    fn = self.session._make_callable_from_options(opts)  # noqa: SLF001 - no public equivalent
                    self._callables[key] = fn
        return fn

    def signature_fn(self, sig_def, trace_name: str = "Session.run") -> Callable:
        in_names = {k: v.name for k, v in sig_def.inputs.items()}
        out_names = {k: v.name for k, v in sig_def.outputs.items()}

        def run(inputs: Mapping[str, np.ndarray], aliases: tuple[str, ...]) -> dict[str, np.ndarray]:
            with _trace(trace_name):
                return _run(inputs, aliases)

        def _run(inputs: Mapping[str, np.ndarray], aliases: tuple[str, ...]) -> dict[str, np.ndarray]:
            feed_aliases = tuple(sorted(inputs))
            fn = self.callable_for(tuple(in_names[a] for a in feed_aliases), tuple(out_names[a] for a in aliases))
            values = fn(*(inputs[a] for a in feed_aliases))
            return {a: np.asarray(v) for a, v in zip(aliases, values)}
        return run

    def close(self) -> None:
        self.session.close()


def _signature_defs(meta_graph):
    from tensorflow_serving.apis import get_model_metadata_pb2

    out = get_model_metadata_pb2.SignatureDefMap()
    defs = getattr(meta_graph, "signature_def", None)
    if defs is None:  # a TfLiteRunner
        defs = meta_graph.signature_defs
    for key, sig in defs.items():
        out.signature_def[key].CopyFrom(sig)
    return out


@dataclass(frozen=True)
class Servable:
    """One loaded version of a model."""

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Signature]
    signature_def_map: object = field(repr=False, compare=False)  # get_model_metadata_pb2.SignatureDefMap
    handle: object = field(repr=False, compare=False)  # the SessionRunner, kept alive

    def signature(self, name: str) -> Signature:
        sig = self.signatures.get(name or DEFAULT_SIGNATURE)
        if sig is None:
            raise SignatureNotFound(
                f"Serving signature key \"{name or DEFAULT_SIGNATURE}\" not found.")
        return sig


def read_signature_defs(path: Path):
    """The SignatureDefs of the ``serve`` MetaGraph, as TF Serving reports them."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    if (path / "saved_model.pb").exists():
        sm.ParseFromString((path / "saved_model.pb").read_bytes())
    else:
        text_format.Parse((path / "saved_model.pbtxt").read_text(), sm)
    if not sm.meta_graphs:
        raise ModelLoadError(f"{path}: SavedModel has no MetaGraph")
    mg = next((m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags), sm.meta_graphs[0])
    return _signature_defs(mg)


def load_servable(name: str, version: int, path: Path, warmup: bool = True, prefer_tflite: bool = False
                  ) -> Servable:
    """Load one SavedModel version (TF1 or TF2) into its own session, or with ``prefer_tflite`` its
    model.tflite when there is one (TF Serving's ``--prefer_tflite_model``); raises :class:`ModelLoadError`."""
    t0 = time.perf_counter()
    try:
        if prefer_tflite and (path / TFLITE_FILE).exists():
            from .tflite import TfLiteRunner

            runner = TfLiteRunner(path)
            sdm = _signature_defs(runner)
        else:
            runner = SessionRunner(path)
            sdm = _signature_defs(runner.meta_graph)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model '{name}' version {version} from {path}: {exc}") from exc
    sigs: dict[str, Signature] = {}
    for key, sd in sdm.signature_def.items():
        if key == INIT_OP_SIGNATURE:
            continue
        sigs[key] = Signature(
            name=key,
            inputs={k: TensorSpecInfo.from_tensor_info(v) for k, v in sd.inputs.items()},
            outputs={k: TensorSpecInfo.from_tensor_info(v) for k, v in sd.outputs.items()},
            fn=runner.signature_fn(sd, f"{name}:{version}:{key}"),
            method_name=sd.method_name,
        )
    servable = Servable(name, version, path, sigs, sdm, runner)
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
    def __init__(self, models: Sequence[ModelConfig], loader: Loader | None = None, prefer_tflite: bool = False):
        self._prefer_tflite = prefer_tflite
        self._loader = loader or functools.partial(load_servable, prefer_tflite=prefer_tflite)
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
        with self._refresh_lock, _trace("ModelRegistry.refresh"):
            result = RefreshResult()
            new: dict[str, dict[int, Servable]] = {}
            for name, cfg in self._configs.items():
                current = self._servables.get(name, {})
                on_disk = version_paths(cfg.base_path, self._prefer_tflite)
                wanted = cfg.version_policy.select(list(on_disk))
                kept: dict[int, Servable] = {}
                for v in wanted:
                    if v in current:
                        kept[v] = current[v]
                        continue
                    path = on_disk[v]
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
                    if version_paths(cfg.base_path, tflite=True) and not self._prefer_tflite:
                        raise ModelLoadError(
                            f"model '{name}' under {cfg.base_path} is a TensorFlow Lite model (model.tflite); "
                            "serve it with --prefer_tflite_model=true")
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
    for f in (*MODEL_FILES, TFLITE_FILE):
        try:
            return (path / f).stat().st_mtime
        except OSError:
            continue
    return 0.0
