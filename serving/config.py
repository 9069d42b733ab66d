"""Server and model configuration: dataclasses, flag parsing, model config files.

Flags follow ``tensorflow_model_server`` where they overlap (``--port``,
``--model_name``, ``--model_base_path``, ``--model_config_file``,
``--enable_batching``, ``--file_system_poll_wait_seconds``, ``--rest_api_port``);
the rest are ours. Pure logic only: nothing here loads models or opens sockets.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from .errors import ConfigError

DEFAULT_PORT = 8500
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SIGNATURE = "serving_default"

PolicyKind = Literal["latest", "all", "specific"]


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions under a base path are served (TF Serving's ServableVersionPolicy)."""

    kind: PolicyKind = "latest"
    num_versions: int = 1  # for "latest"
    versions: tuple[int, ...] = ()  # for "specific"

    @classmethod
    def latest(cls, num_versions: int = 1) -> "VersionPolicy":
        return cls("latest", num_versions=num_versions)

    @classmethod
    def all(cls) -> "VersionPolicy":
        return cls("all")

    @classmethod
    def specific(cls, *versions: int) -> "VersionPolicy":
        return cls("specific", versions=tuple(sorted(set(int(v) for v in versions))))

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve, ascending, out of those present on disk."""
        avail = sorted(set(available))
        if self.kind == "all":
            return avail
        if self.kind == "specific":
            return [v for v in avail if v in self.versions]
        return avail[-max(1, self.num_versions):] if avail else []


@dataclass(frozen=True)
class ModelConfig:
    """One model: ``base_path/<version>/saved_model.pb`` (TF Serving's layout)."""

    name: str
    base_path: Path
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    version_labels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model name must not be empty")
        object.__setattr__(self, "base_path", Path(self.base_path))


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent requests for the same servable and signature.

    ``batch_timeout_micros == 0`` is opportunistic batching: a batch starts as soon
    as the worker is free and takes every compatible request queued meanwhile, so an
    idle server adds no latency. A positive timeout waits that long for more rows.
    """

    enabled: bool = True
    max_batch_size: int = 256  # rows; a single larger request still runs, alone
    batch_timeout_micros: int = 0


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelConfig, ...]
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    num_inference_threads: int = 2
    poll_seconds: float = 1.0  # <= 0: scan the base paths once, at startup
    grace_seconds: float = 5.0


# ---------------------------------------------------------------- model config files

def policy_from_proto(policy) -> VersionPolicy:
    """``FileSystemStoragePathSourceConfig.ServableVersionPolicy`` -> :class:`VersionPolicy`."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy.all()
    if which == "specific":
        if not policy.specific.versions:
            raise ConfigError("model_version_policy.specific needs at least one version")
        return VersionPolicy.specific(*policy.specific.versions)
    if which == "latest":
        return VersionPolicy.latest(policy.latest.num_versions or 1)
    return VersionPolicy.latest(1)  # TF Serving's default


def models_from_proto(msg) -> list[ModelConfig]:
    """A ``ModelServerConfig`` message -> :class:`ModelConfig` list (only ``model_config_list``)."""
    if msg.WhichOneof("config") != "model_config_list":
        raise ConfigError("model config must contain a model_config_list")
    models: list[ModelConfig] = []
    for cfg in msg.model_config_list.config:
        if not cfg.name or not cfg.base_path:
            raise ConfigError(f"every model config needs name and base_path, got: {cfg}".strip())
        if cfg.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"model {cfg.name!r}: unsupported model_platform {cfg.model_platform!r}")
        models.append(ModelConfig(
            name=cfg.name,
            base_path=Path(cfg.base_path),
            version_policy=policy_from_proto(cfg.model_version_policy),
            version_labels={k: int(v) for k, v in cfg.version_labels.items()},
        ))
    check_unique(models)
    return models


def parse_model_config_text(text: str) -> list[ModelConfig]:
    """Parse a ``ModelServerConfig`` text proto (``model_config_list { config { ... } }``).

    Relative ``base_path`` values stay relative to the working directory, as in TF Serving.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    msg = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(f"invalid model config: {exc}") from exc
    return models_from_proto(msg)


def load_model_config_file(path: str | Path) -> list[ModelConfig]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read model config file {path}: {exc}") from exc
    return parse_model_config_text(text)


def check_unique(models: Sequence[ModelConfig]) -> None:
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"duplicate model names: {', '.join(dupes)}")


# ---------------------------------------------------------------- flags

def _flag_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hashguard-serving",
        description="PredictionService-compatible gRPC model server for SavedModels "
                    "(a stand-in for tensorflow_model_server).",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: pick a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--model_name", default="default", help="name of the single model (with --model_base_path)")
    p.add_argument("--model_base_path", help="folder holding <version>/saved_model.pb")
    p.add_argument("--model_config_file", help="ModelServerConfig text proto with a model_config_list")
    p.add_argument("--grpc_max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="max gRPC receive and send message size")
    p.add_argument("--enable_batching", type=_flag_bool, nargs="?", const=True, default=True,
                   help="batch concurrent requests (default true; --enable_batching=false to disable)")
    p.add_argument("--max_batch_size", type=int, default=BatchingConfig.max_batch_size,
                   help="max rows per batch")
    p.add_argument("--batch_timeout_micros", type=int, default=BatchingConfig.batch_timeout_micros,
                   help="how long a batch waits for more rows (0: opportunistic, no added latency)")
    p.add_argument("--num_inference_threads", type=int, default=ServerConfig.num_inference_threads,
                   help="threads running model calls")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=ServerConfig.poll_seconds,
                   help="interval between scans of base paths for new versions (<=0: only at startup)")
    p.add_argument("--grace_seconds", type=float, default=ServerConfig.grace_seconds,
                   help="grace period for in-flight RPCs on SIGTERM/SIGINT")
    p.add_argument("--rest_api_port", type=int, default=0, help="accepted for compatibility; REST is not served")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.model_config_file and args.model_base_path:
        raise ConfigError("use either --model_config_file or --model_base_path, not both")
    if args.model_config_file:
        models = load_model_config_file(args.model_config_file)
    elif args.model_base_path:
        models = [ModelConfig(args.model_name, Path(args.model_base_path))]
    else:
        raise ConfigError("one of --model_base_path or --model_config_file is required")
    if not models:
        raise ConfigError("no models configured")
    if args.max_batch_size < 1:
        raise ConfigError("--max_batch_size must be >= 1")
    if args.grpc_max_message_bytes < 1024:
        raise ConfigError("--grpc_max_message_bytes must be >= 1024")
    return ServerConfig(
        models=tuple(models),
        host=args.host,
        port=args.port,
        max_message_bytes=args.grpc_max_message_bytes,
        batching=BatchingConfig(args.enable_batching, args.max_batch_size, max(0, args.batch_timeout_micros)),
        num_inference_threads=max(1, args.num_inference_threads),
        poll_seconds=args.file_system_poll_wait_seconds,
        grace_seconds=args.grace_seconds,
    )


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Flags -> :class:`ServerConfig`; exits with a usage message on bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
