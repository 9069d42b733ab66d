"""``hashguard-sidecar``: run the sidecar until SIGTERM/SIGINT, then drain.

Start-up is all or nothing: flag values (``Settings``), the files they name and
every port (gRPC, REST, metrics) are checked, and all ports are bound, before
any of them is served. Anything wrong is ONE line on stderr and exit status 2.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from . import logs
from .config import from_args
from .startup import StartupError, preflight, return_large_buffers

log = logging.getLogger("hashguard.cli")

PROG = "hashguard-sidecar"


async def serve(settings) -> None:
    from .server import SidecarServer  # imports the gRPC stack: after arg parsing

    preflight(settings)
    return_large_buffers()  # a freed request body goes back to the system (see its text)
    server = SidecarServer(settings)
    try:
        if settings.metrics_port:
            try:
                server.metrics.bind(settings.metrics_port, settings.metrics_host)
            except OSError as exc:
                raise StartupError(f"metrics port {settings.metrics_host}:{settings.metrics_port} (--metrics-port): "
                                   f"{exc.strerror or exc}") from None
        await server.start()
    except BaseException:
        server.metrics.close()
        await server.stop(0)
        raise
    if settings.metrics_port:
        server.metrics.serve_bound()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.grace_s})
    await server.stop()
    server.metrics.close()
    from .transport.rest import shutdown_parse_pool

    shutdown_parse_pool()


def fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        settings = from_args(argv)
    except ValueError as exc:
        return fail(str(exc))
    logs.setup(settings.log_level)
    if settings.workers > 1:  # a supervisor of N worker processes (sidecar/workers.py)
        from .workers import supervise

        return supervise(settings, serve)
    try:
        asyncio.run(serve(settings))
    except (StartupError, ValueError) as exc:  # ValueError: e.g. an auth verifier that is not one
        return fail(str(exc))
    except (ImportError, OSError) as exc:
        return fail(f"cannot start: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
