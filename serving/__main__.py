"""``python -m serving`` / ``hashguard-serving``: flags like ``tensorflow_model_server``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

from .config import ServerConfig, build_parser, config_from_args
from .errors import ConfigError

log = logging.getLogger("serving")


async def serve(cfg: ServerConfig) -> int:
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
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
