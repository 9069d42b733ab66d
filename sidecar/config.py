"""Sidecar settings: command-line flags, each also a HASHGUARD_<NAME> variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from .judgment import PAPER_THRESHOLD
from .padding import MODES as PADDING_MODES
from .policy import POLICIES, OutputPolicy

JUDGMENT_MODES = ("paper", "hardened", "off")


def radius_of(settings: "Settings") -> int:
    return int(settings.threshold) if settings.index_radius < 0 else settings.index_radius


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Settings:
    backend: str = "127.0.0.1:8500"
    host: str = "0.0.0.0"
    port: int = field(default=8600, metadata={"help": "gRPC port (0 picks a free one)"})
    mode: str = field(default="paper", metadata={"choices": JUDGMENT_MODES, "help": "judgment: paper (Algorithm 1), hardened, off (pass-through)"})
    threshold: float = field(default=PAPER_THRESHOLD, metadata={"help": "N_threshold for hash distance and differing pixels"})
    pixel_tolerance: float = field(default=0.0, metadata={"help": "per-channel difference that still counts as the same pixel"})
    history: int = field(default=8, metadata={"help": "hardened: anchors kept per session"})
    padding: str = field(default="distribution", metadata={"choices": PADDING_MODES, "help": "time layer"})
    padding_target_ms: float = field(default=0.0, metadata={"help": "fixed padding: answer no sooner than this"})
    padding_floor_ms: float = field(default=0.0, metadata={"help": "minimum latency of every answer"})
    padding_window: int = field(default=200, metadata={"help": "recent forwarded latencies per model and size bucket the distribution draws from (small: follows load changes)"})
    index_window: int = field(default=100_000, metadata={"help": "hardened: forwarded images remembered across sessions, per model"})
    index_ttl_s: float = field(default=3600.0, metadata={"help": "hardened: seconds a cross-session entry stays (0 = no limit)"})
    index_radius: int = field(default=-1, metadata={"help": "hardened: hash distance for a cross-session hit (-1 = floor(threshold))"})
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
    max_sessions: int = 100_000
    session_ttl_s: float = 3600.0
    session_header: str = "x-session-id"
    require_session: bool = field(default=False, metadata={"help": "reject calls without a session id instead of using the peer address"})
    max_session_id_len: int = 256
    max_batch: int = field(default=1024, metadata={"help": "images per ClassifyBatch/Predict call"})
    max_message_bytes: int = 16 << 20
    backend_timeout_s: float = 10.0
    metrics_port: int = field(default=9600, metadata={"help": "Prometheus /metrics port (0 disables)"})
    log_level: str = "INFO"
    grace_s: float = field(default=5.0, metadata={"help": "graceful shutdown: seconds to drain in-flight calls"})

    def __post_init__(self) -> None:
        if self.mode not in JUDGMENT_MODES:
            raise ValueError(f"mode must be one of {JUDGMENT_MODES}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}")
        if self.session_store != "memory" and not self.session_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("session_store must be 'memory' or a redis:// URL")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.history < 1 or self.index_window < 1 or self.max_batch < 1 or self.max_session_id_len < 1:
            raise ValueError("history, max_batch and max_session_id_len must be >= 1")


def output_policy(settings: Settings) -> OutputPolicy:
    return OutputPolicy(settings.output, settings.topk, settings.score_precision, settings.score_noise,
                        bytes.fromhex(settings.noise_key))


def env_name(name: str) -> str:
    return "HASHGUARD_" + name.upper()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hashguard-sidecar",
        description="Perceptual-hash defense sidecar in front of TensorFlow Serving. "
        "Every flag can also be set as HASHGUARD_<FLAG> (e.g. HASHGUARD_BACKEND).",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        kind = _bool if f.type in ("bool", bool) else {"int": int, "float": float}.get(str(f.type), str)
        default = kind(os.environ[env]) if env in os.environ else f.default
        help_text = f.metadata.get("help", "")
        ap.add_argument(flag, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                        help=f"{help_text} [env {env}; default {f.default}]".strip())
    return ap


def from_args(argv: list[str] | None = None) -> Settings:
    ns = parser().parse_args(argv)
    return Settings(**vars(ns))
