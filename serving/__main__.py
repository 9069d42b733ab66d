"""``python -m serving`` / ``hashguard-serving``: flags like ``tensorflow_model_server``."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from .config import ServerConfig, build_parser, config_from_args
from .errors import ConfigError

log = logging.getLogger("serving")


def reserve_ports(host: str, ports: Sequence[int]) -> list[socket.socket]:
    """Hold the requested ports from process start until the server has bound them.

    Importing TensorFlow and loading models take seconds; a port picked free by
    whoever started us (TF Serving's tests use portpicker) could meanwhile become
    another socket's, e.g. the local end of an outgoing connection. A socket bound
    with SO_REUSEADDR and not listening keeps others off the port, while the
    server's own sockets (also SO_REUSEADDR) can still bind it.
    """
    held = []
    for port in ports:
        if not port:
            continue
        wildcard = host in ("", "0.0.0.0", "::", "[::]")
        family = socket.AF_INET6 if wildcard or ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if wildcard:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::" if wildcard else host.strip("[]"), port))
        except OSError as exc:
            s.close()
            if wildcard and family == socket.AF_INET6 and exc.errno != errno.EADDRINUSE:  # no IPv6 here
                try:
                    held += _reserve_v4(port)
                except OSError:
                    for h in held:
                        h.close()
                    raise
                continue
            for h in held:
                h.close()
            raise OSError(f"cannot bind to port {port}: {exc}") from exc
        held.append(s)
    return held


def _reserve_v4(port: int) -> list[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
    except OSError as exc:
        s.close()
        raise OSError(f"cannot bind to port {port}: {exc}") from exc
    return [s]


async def serve(cfg: ServerConfig, reserved: Sequence[socket.socket] = ()) -> int:
    from .errors import ServingError
    from .server import ServingServer

    server = ServingServer.from_config(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (ServingError, OSError) as exc:
        log.error("%s", exc)
        await server.stop(0)
        return 1
    finally:
        for s in reserved:
            s.close()
    await stop.wait()
    log.info("Shutdown requested; draining for up to %.1f s", cfg.grace_seconds)
    await server.stop(cfg.grace_seconds)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        reserved = reserve_ports(cfg.host, [cfg.port, cfg.rest_port])
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return asyncio.run(serve(cfg, reserved))


if __name__ == "__main__":
    sys.exit(main())
