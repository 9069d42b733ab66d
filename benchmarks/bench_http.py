"""Which async HTTP server for the REST front door: aiohttp.web vs starlette+uvicorn.

Each server runs in its own process with one JSON ``:predict``-shaped POST route
that parses the body and answers a small JSON document (the work the REST
adapter does around the data plane). The same keep-alive client (a raw asyncio
HTTP/1.1 loop, so neither library's client is favoured) sends N requests with C
in flight; we report p50/p99 latency and throughput, and the ratio between the
two servers, and the server process's CPU time per request (the overhead
that matters on a shared machine, and the figure least disturbed by other
load). ``python -m benchmarks.bench_http [--n 2000] [--conc 4] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BODY = json.dumps({"instances": [[[[0.5] * 3] * 32] * 32]}).encode()  # one 32x32x3 image, row format

SERVERS = {
    "aiohttp": """
import json, sys
from aiohttp import web
async def predict(request):
    body = json.loads(await request.read())
    return web.json_response({"predictions": [[0.1] * 10 for _ in body["instances"]]})
app = web.Application(client_max_size=1 << 24)
app.router.add_post("/v1/models/{name}:predict", predict)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""",
    "starlette+uvicorn": """
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
async def predict(request):
    body = json.loads(await request.body())
    return JSONResponse({"predictions": [[0.1] * 10 for _ in body["instances"]]})
app = Starlette(routes=[Route("/v1/models/{name}:predict", predict, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
""",
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_connection(port: int, n: int, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode()
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(head + BODY)
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
    writer.close()


async def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(port)


async def measure(name: str, n: int, conc: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVERS[name], str(port)])
    try:
        await wait_port(port)
        await asyncio.gather(*(one_connection(port, 50, []) for _ in range(conc)))  # warm-up
        lat: list[float] = []
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_connection(port, n // conc, lat) for _ in range(conc)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait()
    lat.sort()
    return {"p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[int(len(lat) * 0.99)], "rps": len(lat) / wall,
            "server_cpu_us_per_request": 1e6 * cpu / len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--conc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is reported")
    ap.add_argument("--out", default="reports/bench_http.json")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in SERVERS}
    for r in range(args.rounds):  # alternate the order: load from other processes hits both alike
        for name in (list(SERVERS) if r % 2 == 0 else list(SERVERS)[::-1]):
            runs[name].append(asyncio.run(measure(name, args.n, args.conc)))
    results: dict = {}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["rps"])
        results[name] = {**rs[len(rs) // 2], "rps_all": [round(x["rps"], 1) for x in rs],
                         "cpu_us_all": sorted(round(x["server_cpu_us_per_request"]) for x in rs)}
    a, s = results["aiohttp"], results["starlette+uvicorn"]
    results["ratio_rps_aiohttp_over_starlette"] = a["rps"] / s["rps"]
    results["ratio_p50_aiohttp_over_starlette"] = a["p50_ms"] / s["p50_ms"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    results["ratio_cpu_aiohttp_over_starlette"] = med(a["cpu_us_all"]) / med(s["cpu_us_all"])
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "conc": args.conc, "rounds": args.rounds, **results}, indent=2))


if __name__ == "__main__":
    main()
