"""Sidecar settings: command-line flags, each also a HASHGUARD_<NAME> variable."""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from .state.crosssession import DEFAULT_BUDGET, DEFAULT_HISTORY, DEFAULT_PRINCIPALS, DEFAULT_RADIUS
from .judge.judgment import HARDENED_TAU, PAPER_THRESHOLD
from .plane.methods import parse_passthrough
from .plane.padding import MODES as PADDING_MODES
from .judge.policy import POLICIES, OutputPolicy

JUDGMENT_MODES = ("paper", "hardened", "off")
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Settings:
    backend: str = field(default="127.0.0.1:8500", metadata={"help": "TF Serving gRPC address, HOST:PORT or a gRPC target (dns:///host:port, unix:/path)"})
    host: str = field(default="0.0.0.0", metadata={"help": "address the gRPC, REST and metrics ports bind (0.0.0.0: every interface; 127.0.0.1: this host only)"})
    port: int = field(default=8600, metadata={"help": "gRPC port (0 picks a free one)"})
    mode: str = field(default="paper", metadata={"choices": JUDGMENT_MODES, "help": "judgment: paper (Algorithm 1), hardened, off (pass-through)"})
    threshold: float = field(default=PAPER_THRESHOLD, metadata={"help": "N_threshold for hash distance and differing pixels"})
    pixel_tolerance: float = field(default=0.0, metadata={"help": "per-channel difference that still counts as the same pixel"})
    history: int = field(default=8, metadata={"help": "hardened: anchors kept per session"})
    padding: str = field(default="distribution", metadata={"choices": PADDING_MODES, "help": "time layer: every answer, cached or forwarded, leaves at a release time fixed on arrival (distribution: a quantile of recent forwards; fixed: --padding-target-ms); off: answers leave when ready, and cached ones are faster"})
    cover_forwards: bool = field(default=True, metadata={"help": "time layer: a call answered from a cache still sends its images to the model before its release and drops the answer, so a cached answer costs the host a forward's work and leaves nothing behind that tells the next call it was cached (off: less backend load; the padding alone leaks about 0.1 ms on a quiet host, see docs/measurements.md)"})
    padding_target_ms: float = field(default=0.0, metadata={"help": "fixed padding: answer no sooner than this"})
    padding_floor_ms: float = field(default=0.0, metadata={"help": "minimum latency of every answer"})
    padding_window: int = field(default=1000, metadata={"help": "recent forwarded latencies per model and size bucket the release time is taken from (small: follows load changes sooner; large: a few slow forwards do not move it)"})
    padding_quantile: float = field(default=0.99, metadata={"help": "distribution padding: release at this quantile of the recent forwarded latencies (forwards slower than it leave when ready, counted in hashguard_padding_late_total)"})
    padding_margin_ms: float = field(default=1.0, metadata={"help": "distribution padding: added to the quantile"})
    index_window: int = field(default=100_000, metadata={"help": "hardened: forwarded images remembered across sessions, per model"})
    index_ttl_s: float = field(default=3600.0, metadata={"help": "hardened: seconds a cross-session entry stays (0 = no limit)"})
    index_replication: bool = field(default=True, metadata={"help": "hardened with a redis session store: replicas share the cross-session index over a Redis stream"})
    index_radius: float = field(default=DEFAULT_RADIUS, metadata={"help": "hardened: transform-tolerant feature distance (0-2) within which an image the same principal forwarded recently is a near-duplicate"})
    cluster_budget: int = field(default=DEFAULT_BUDGET, metadata={"help": "hardened: real answers one principal (authenticated principal, else client address) gets for near-duplicates of one image; further ones get its own nearest earlier answer (nothing is refused)"})
    principal_history: int = field(default=DEFAULT_HISTORY, metadata={"help": "hardened: recent forwarded images remembered per principal and model for the near-duplicate budget"})
    max_principals: int = field(default=DEFAULT_PRINCIPALS, metadata={"help": "hardened: principals whose history is kept (least recently used out first)"})
    lowpass_threshold: float = field(default=HARDENED_TAU, metadata={"help": "hardened: low-pass distance (0-1 scale) up to which a query is similar to its session's anchor"})
    auth_tokens: str = field(default="", metadata={"help": "file of '<token> <principal>' lines; sessions become principals"})
    auth_verifier: str = field(default="", metadata={"help": "module:attr of a custom token verifier"})
    tls_cert: str = field(default="", metadata={"help": "server certificate (PEM); enables TLS"})
    tls_key: str = field(default="", metadata={"help": "server private key (PEM)"})
    tls_client_ca: str = field(default="", metadata={"help": "CA for client certificates: mTLS, the certificate's CN is the principal"})
    output: str = field(default="scores", metadata={"choices": POLICIES, "help": "what responses reveal: scores, topk or label"})
    topk: int = field(default=3, metadata={"help": "labels shown by the topk output policy"})
    score_precision: int = field(default=4, metadata={"help": "decimals of shown scores (0 = unrounded)"})
    score_noise: float = field(default=0.2, metadata={"help": "std of keyed log-space noise on shown scores (0 = exact)"})
    noise_key: str = field(default="", metadata={"help": "hex key for the score noise; share it across replicas (default: random per process)"})
    session_store: str = field(default="memory", metadata={"help": "memory, or redis://[:pw@]host:port/db (rediss://, unix://) to share sessions across replicas"})
    max_sessions: int = field(default=100_000, metadata={"help": "sessions held in memory; the least recently used is evicted beyond this"})
    session_ttl_s: float = field(default=3600.0, metadata={"help": "seconds an idle session keeps its anchors"})
    session_header: str = field(default="x-session-id", metadata={"help": "gRPC metadata key / HTTP header carrying the session id"})
    require_session: bool = field(default=False, metadata={"help": "reject calls without a session id instead of using the peer address"})
    max_session_id_len: int = field(default=256, metadata={"help": "longest session id accepted (longer: INVALID_ARGUMENT / 400)"})
    max_model_name_len: int = field(default=256, metadata={"help": "longest model name looked up; a longer one is NOT_FOUND (404) without asking the backend"})
    max_batch: int = field(default=1024, metadata={"help": "images per ClassifyBatch/Predict call"})
    max_image_pixels: int = field(default=1 << 24, metadata={"help": "pixels (height x width) an image may declare; checked from the PNG/JPEG header before decoding"})
    max_message_bytes: int = field(default=16 << 20, metadata={"help": "largest gRPC message or REST body, in bytes (larger: RESOURCE_EXHAUSTED / 413)"})
    backend_timeout_s: float = field(default=10.0, metadata={"help": "seconds a backend call may take before DEADLINE_EXCEEDED"})
    backend_inflight: int = field(default=2, metadata={"help": "Predict calls in flight per served model; forwards beyond them wait and go together as one batch (0 = no limit, no batching)"})
    metrics_port: int = field(default=9600, metadata={"help": "Prometheus /metrics port (0 disables)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address /metrics binds (no authentication): loopback unless set wider, e.g. 0.0.0.0 in a container scraped over the pod network"})
    rest_port: int = field(default=8601, metadata={"help": "TF Serving REST API port (0 disables); request bodies are limited to --max-message-bytes"})
    http_idle_timeout_s: float = field(default=15.0, metadata={"help": "REST: a connection that has not sent a complete request head this long after it opened or after its last answer is closed"})
    http_body_timeout_s: float = field(default=30.0, metadata={"help": "REST: a request body not received in full within this time is answered 408 and its connection closed"})
    max_connections: int = field(default=10000, metadata={"help": "open connections per port (REST and gRPC each); lowered at start to fit the file-descriptor limit; REST closes its oldest idle connection to admit a new one"})
    passthrough: str = field(default="", metadata={"help": "comma list of UNPROTECTED methods to pass to the model unjudged: classify, regress, multi_inference, reload_config (default: refused)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR or CRITICAL (JSON lines on stderr)"})
    grace_s: float = field(default=5.0, metadata={"help": "graceful shutdown: seconds to drain in-flight calls"})
    workers: int = field(default=1, metadata={"help": "sidecar processes on this host sharing the port (SO_REUSEPORT); > 1 needs a redis session store"})

    def __post_init__(self) -> None:
        """Every value is checked here, so a bad one stops the start with one message
        (``ValueError``) before anything is bound or connected."""
        if self.mode not in JUDGMENT_MODES:
            raise ValueError(f"--mode must be one of {', '.join(JUDGMENT_MODES)}, got {self.mode!r}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"--padding must be one of {', '.join(PADDING_MODES)}, got {self.padding!r}")
        check_backend_target(self.backend)
        check_store_url(self.session_store)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.backend_inflight < 0:
            raise ValueError(f"--backend-inflight must be >= 0, got {self.backend_inflight}")
        if self.workers > 1 and self.session_store == "memory":
            raise ValueError("--workers > 1 needs --session-store redis://...: workers share sessions only through it")
        for name in ("history", "index_window", "principal_history", "max_principals", "max_batch", "max_session_id_len",
                     "max_model_name_len", "max_connections", "max_sessions",
                     "max_message_bytes", "max_image_pixels", "topk", "padding_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.padding_quantile <= 1:
            raise ValueError(f"--padding-quantile must be within 0..1, got {self.padding_quantile}")
        for name in ("threshold", "pixel_tolerance", "padding_target_ms", "padding_floor_ms", "padding_margin_ms", "index_ttl_s",
                     "score_precision", "score_noise", "session_ttl_s", "grace_s"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # also NaN
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        for name in ("backend_timeout_s", "http_idle_timeout_s", "http_body_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{_flag(name)} must be > 0, got {value}")
        if self.index_radius < 0 or self.lowpass_threshold < 0 or self.cluster_budget < 1:
            raise ValueError("--index-radius and --lowpass-threshold must be >= 0 and --cluster-budget >= 1")
        for name in ("port", "metrics_port", "rest_port"):
            value = getattr(self, name, 0)
            if not 0 <= value <= 65535:
                raise ValueError(f"{_flag(name)} must be a port number 0..65535, got {value}")
        parse_passthrough(self.passthrough)
        try:
            bytes.fromhex(self.noise_key)
        except ValueError:
            raise ValueError("--noise-key must be hexadecimal (e.g. `openssl rand -hex 32`)") from None
        if logging.getLevelName(str(self.log_level).upper()) not in (10, 20, 30, 40, 50):
            raise ValueError(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")


def passthrough_methods(settings: "Settings") -> frozenset[str]:
    return parse_passthrough(settings.passthrough)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_backend_target(target: str) -> None:
    """HOST:PORT, [IPv6]:PORT, or a gRPC target URI (dns:///host:port, unix:/path, ...)."""
    if target.startswith(_GRPC_SCHEMES):
        return
    m = _HOST_PORT.match(target)
    if not m or not 0 < int(m.group(2)) <= 65535:
        raise ValueError(f"--backend must be HOST:PORT (or a gRPC target such as dns:///host:port), got {target!r}")


def check_store_url(url: str) -> None:
    if url == "memory":
        return
    problem = "--session-store must be 'memory' or redis://[:password@]host[:port][/db] (rediss://, unix:///path)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{problem}, got {url!r}") from None
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.lstrip("/")
        if not parts.hostname or (db and not db.isdigit()):
            raise ValueError(f"{problem}, got {url!r}")
    elif parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{problem}, got {url!r}")
    else:
        raise ValueError(f"{problem}, got {url!r}")


def check_files(settings: "Settings") -> None:
    """Files named by flags exist and can be read (I/O, so apart from ``__post_init__``)."""
    for name in ("auth_tokens", "tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(settings, name)
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ValueError(f"{_flag(name)} {path}: {exc.strerror or exc}") from None


def output_policy(settings: Settings) -> OutputPolicy:
    return OutputPolicy(settings.output, settings.topk, settings.score_precision, settings.score_noise,
                        bytes.fromhex(settings.noise_key))


def env_name(name: str) -> str:
    return "HASHGUARD_" + name.upper()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse prints the whole usage)."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _from_env(env: str, kind, choices):
    text = os.environ[env]
    try:
        value = kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{env}={text!r}: not a valid {getattr(kind, '__name__', 'value').strip('_')}") from None
    if choices and value not in choices:
        raise ValueError(f"{env}={text!r}: must be one of {', '.join(choices)}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="hashguard-sidecar",
        description="Perceptual-hash defense sidecar in front of TensorFlow Serving. "
        "Every flag can also be set as HASHGUARD_<FLAG> (e.g. HASHGUARD_BACKEND).",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        kind = _bool if f.type in ("bool", bool) else {"int": int, "float": float}.get(str(f.type), str)
        default = _from_env(env, kind, f.metadata.get("choices")) if env in os.environ else f.default
        help_text = f.metadata.get("help", "")  # every setting says what it does (a test checks it)
        extra: dict[str, Any] = {"nargs": "?", "const": True, "metavar": "BOOL"} if kind is _bool else {}
        ap.add_argument(flag, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                        help=f"{help_text} [env {env}; default {f.default}]", **extra)
    return ap


def from_args(argv: list[str] | None = None) -> Settings:
    ns = parser().parse_args(argv)
    return Settings(**vars(ns))
