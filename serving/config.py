"""Server and model configuration: dataclasses, flag parsing, model config files.

Flags follow ``tensorflow_model_server`` (docs/serving.md lists which are
implemented and which are accepted and ignored); ``--host``,
``--grpc_max_message_bytes``, ``--max_batch_size``, ``--batch_timeout_micros``,
``--num_inference_threads`` and ``--grace_seconds`` are ours. Pure logic only: nothing here loads models or opens sockets.
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
    rest_port: int = 0  # 0: no REST API
    rest_timeout_ms: int = 30000
    grpc_socket_path: str = ""  # also serve gRPC on this Unix socket
    channel_arguments: tuple[tuple[str, int | str], ...] = ()
    model_config_file: str = ""  # re-read every config_poll_seconds when > 0
    config_poll_seconds: float = 0.0
    prometheus_path: str = ""  # from --monitoring_config_file; "" = no metrics endpoint
    prefer_tflite: bool = False  # serve <version>/model.tflite where there is one


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
    except text_format.ParseError as exc:  # TF Serving's words, which its tests look for
        raise ConfigError(f"Error parsing text-format tensorflow.serving.ModelServerConfig: {exc}") from exc
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
    p.add_argument("--rest_api_port", type=int, default=0,
                   help="serve TF Serving's REST API (v1) on this port (0: no REST API)")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=ServerConfig.rest_timeout_ms,
                   help="deadline of one REST call")
    p.add_argument("--grpc_socket_path", default="",
                   help="also serve gRPC on this Unix domain socket")
    p.add_argument("--grpc_channel_arguments", default="",
                   help="comma-separated key=value gRPC server arguments (numbers become integers)")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                   help="re-read --model_config_file this often and apply changes (0: read once)")
    p.add_argument("--monitoring_config_file", default="",
                   help="MonitoringConfig text proto; prometheus_config { enable: true path: ... } "
                        "serves Prometheus metrics on the REST port")
    p.add_argument("--batching_parameters_file", default="",
                   help="BatchingParameters text proto: max_batch_size and batch_timeout_micros are used")
    p.add_argument("--prefer_tflite_model", type=_flag_bool, nargs="?", const=True, default=False,
                   help="serve <version>/model.tflite (TensorFlow Lite) where a version has one")
    p.add_argument("--use_tflite_model", type=_flag_bool, nargs="?", const=True, default=False,
                   help="TF Serving's older name of --prefer_tflite_model")
    p.add_argument("--saved_model_tags", default="serve",
                   help="only 'serve' (the MetaGraph TF Serving loads by default) is supported")
    # Accepted so that tensorflow_model_server command lines run unchanged; they tune parts
    # of TF Serving this server does not have (docs/serving.md lists them).
    for flag in IGNORED_FLAGS:
        p.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    # Accepted only to be refused with a reason: ignoring them would change what is served
    # or how (plaintext instead of TLS, another platform's models).
    for flag in REFUSED_FLAGS:
        p.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    return p


IGNORED_FLAGS = (
    "rest_api_num_threads", "rest_api_enable_cors_support", "tensorflow_session_parallelism",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "per_process_gpu_memory_fraction",
    "enable_model_warmup", "num_load_threads", "num_unload_threads",
    "max_num_load_retries", "load_retry_interval_micros",
    "allow_version_labels_for_unavailable_models", "xla_cpu_compilation_enabled",
    "enable_signature_method_name_check", "flush_filesystem_caches", "remove_unused_fields_from_bundle_metagraph",
    "skip_initialize_tpu", "tflite_num_interpreters_per_pool", "tflite_interpreter_pool_size",
    "thread_pool_factory_config_file", "mixed_precision", "enable_profiler",
)
REFUSED_FLAGS = {
    "ssl_config_file": "TLS is not implemented here; put a TLS-terminating proxy (or the sidecar's TLS) in front",
    "platform_config_file": "only the tensorflow platform (SavedModel, TF Lite) is served here",
}


def parse_channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """``"grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb"`` -> gRPC options.

    TF Serving's rule: integers where the value parses as one, strings otherwise.
    """
    out: list[tuple[str, int | str]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--grpc_channel_arguments: expected key=value, got {item!r}")
        try:
            out.append((key, int(value)))
        except ValueError:
            out.append((key, value))
    return tuple(out)


def _text_proto(fields: str, name: str):
    """A message class for a small TF Serving config proto that tensorflow-serving-api does not ship."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    fd = descriptor_pb2.FileDescriptorProto(name=f"hashguard_{name}.proto", package="tensorflow.serving")
    text_format.Parse(fields, fd)
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))


_MONITORING = """
message_type { name: "PrometheusConfig"
  field { name: "enable" number: 1 type: TYPE_BOOL label: LABEL_OPTIONAL }
  field { name: "path" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL } }
message_type { name: "MonitoringConfig"
  field { name: "prometheus_config" number: 1 type: TYPE_MESSAGE label: LABEL_OPTIONAL
          type_name: ".tensorflow.serving.PrometheusConfig" } }
"""
_BATCHING = "".join(
    f'field {{ name: "{n}" number: {i} type: TYPE_MESSAGE label: LABEL_OPTIONAL '
    f'type_name: ".google.protobuf.{t}" }}\n'
    for i, (n, t) in enumerate([("max_batch_size", "Int64Value"), ("batch_timeout_micros", "Int64Value"),
                                ("max_enqueued_batches", "Int64Value"), ("num_batch_threads", "Int64Value"),
                                ("thread_pool_name", "StringValue"), ("allowed_batch_sizes", None),
                                ("pad_variable_length_inputs", "BoolValue")], start=1) if t)
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def load_monitoring_config(path: str) -> str:
    """``--monitoring_config_file`` -> the Prometheus path ("" when disabled)."""
    from google.protobuf import text_format

    msg = _text_proto(_MONITORING, "MonitoringConfig")()
    try:
        text_format.Parse(Path(path).read_text(), msg)
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"Error parsing text-format tensorflow.serving.MonitoringConfig from {path}: {exc}") from exc
    pc = msg.prometheus_config
    return (pc.path or DEFAULT_PROMETHEUS_PATH) if pc.enable else ""


def load_batching_parameters(path: str, base: BatchingConfig) -> BatchingConfig:
    """``--batching_parameters_file`` (BatchingParameters text proto) -> :class:`BatchingConfig`.

    Only max_batch_size and batch_timeout_micros have a meaning here; the other
    fields (threads, queue sizes, allowed sizes, padding) are read and not used.
    """
    from google.protobuf import text_format

    fields = _BATCHING + ('field { name: "allowed_batch_sizes" number: 6 type: TYPE_INT64 '
                          'label: LABEL_REPEATED }')
    msg = _text_proto(f'message_type {{ name: "BatchingParameters" {fields} }}'
                      ' dependency: "google/protobuf/wrappers.proto"', "BatchingParameters")()
    try:
        text_format.Parse(Path(path).read_text(), msg)
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"Error parsing text-format tensorflow.serving.BatchingParameters from {path}: {exc}") \
            from exc
    size = msg.max_batch_size.value if msg.HasField("max_batch_size") else base.max_batch_size
    timeout = msg.batch_timeout_micros.value if msg.HasField("batch_timeout_micros") else base.batch_timeout_micros
    if size < 1:
        raise ConfigError(f"{path}: max_batch_size must be >= 1")
    return BatchingConfig(True, int(size), max(0, int(timeout)))


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
    batching = BatchingConfig(args.enable_batching, args.max_batch_size, max(0, args.batch_timeout_micros))
    if args.batching_parameters_file and args.enable_batching:
        batching = load_batching_parameters(args.batching_parameters_file, batching)
    for flag, why in REFUSED_FLAGS.items():
        if getattr(args, flag):
            raise ConfigError(f"--{flag} is not supported: {why}")
    if set(t.strip() for t in args.saved_model_tags.split(",")) != {"serve"}:
        raise ConfigError(f"--saved_model_tags={args.saved_model_tags}: only 'serve' is supported")
    if args.model_config_file_poll_wait_seconds and not args.model_config_file:
        raise ConfigError("--model_config_file_poll_wait_seconds needs --model_config_file")
    return ServerConfig(
        models=tuple(models),
        host=args.host,
        port=args.port,
        max_message_bytes=args.grpc_max_message_bytes,
        batching=batching,
        num_inference_threads=max(1, args.num_inference_threads),
        poll_seconds=args.file_system_poll_wait_seconds,
        grace_seconds=args.grace_seconds,
        rest_port=args.rest_api_port,
        rest_timeout_ms=max(1, args.rest_api_timeout_in_ms),
        grpc_socket_path=args.grpc_socket_path,
        channel_arguments=parse_channel_arguments(args.grpc_channel_arguments),
        model_config_file=args.model_config_file or "",
        config_poll_seconds=max(0.0, args.model_config_file_poll_wait_seconds),
        prometheus_path=load_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else "",
        prefer_tflite=bool(args.prefer_tflite_model or args.use_tflite_model),
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
