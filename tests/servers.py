"""Test helpers: run `python -m serving` as a real subprocess and wait for health.

Unlike ``lab.stack.Stack`` this can stop and restart the server on the same
port, which the backend-down test needs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port
from lab.stack import model_config_text


def wait_serving(target: str, timeout_s: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout_s}s")


class ServingProcess:
    def __init__(self, model_base: Path, names: list[str], port: int | None = None, tmp: Path | None = None):
        self.port = port or free_port()
        cfg = (tmp or model_base) / f"models-{self.port}.config"
        cfg.write_text(model_config_text({n: model_base / n for n in names}))
        self.cmd = [sys.executable, "-m", "serving", "--port", str(self.port), "--host", "127.0.0.1",
                    "--model_config_file", str(cfg)]
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ServingProcess":
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wait_serving(self.target, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
