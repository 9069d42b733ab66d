"""``hashguard-sidecar``: run the sidecar until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from . import logs
from .config import from_args

log = logging.getLogger("hashguard.cli")


async def serve(settings) -> None:
    from .server import SidecarServer  # imports TensorFlow protos: after arg parsing

    server = SidecarServer(settings)
    await server.start()
    if settings.metrics_port:
        server.metrics.serve(settings.metrics_port, settings.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.grace_s})
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = from_args(argv)
    except ValueError as exc:
        print(f"hashguard-sidecar: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
