"""`make bench`: every benchmark, printed and written as one JSON file."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from benchmarks.stats import emit


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--out", default="reports/bench.json")
    ap.add_argument("--n", type=int, default=1000, help="requests per latency sample")
    ap.add_argument("--only", nargs="*", help="subset: footprint serving sidecar index sessions bombs hostile distinguisher adaptive timing")
    args = ap.parse_args()
    from . import bench_sidecar, bench_serving

    want = set(args.only or ["footprint", "serving", "sidecar", "index", "sessions", "bombs", "distinguisher", "adaptive",
                             "timing"])
    result: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model_base = Path(args.models_dir) / args.model

    def stage(name: str) -> bool:
        if name in want:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
        return name in want

    if stage("footprint"):  # first: a sidecar process on a quiet machine
        from . import bench_footprint

        result["footprint"] = bench_footprint.run()
    if stage("serving"):
        result["serving"] = bench_serving.run(model_base, args.model)
    if stage("sidecar"):
        result["sidecar"] = bench_sidecar.run(args.models_dir, args.model, n=args.n)
    if stage("index"):
        from . import bench_index

        result["index"] = bench_index.run()
    if stage("sessions"):
        from . import bench_sessions

        result["sessions"] = bench_sessions.run()
    if stage("bombs"):
        from . import bench_bombs

        result["bombs"] = bench_bombs.run()
    if stage("hostile"):  # not in the default set: it holds 2 x 20,000 connections for minutes
        from . import bench_hostile

        result["hostile"] = bench_hostile.run()
    if stage("distinguisher"):
        from . import bench_distinguisher

        result["distinguisher"] = bench_distinguisher.run(args.models_dir, args.model)
    if stage("adaptive"):
        from . import bench_adaptive

        result["adaptive"] = bench_adaptive.run(args.models_dir, args.model)
        import tempfile

        from . import bench_hardened

        with tempfile.TemporaryDirectory() as tmp:  # issue 23 (quick; --full and end_to_end at 100: its own CLI)
            result["adaptive"]["hardened_v3"] = bench_hardened.run(
                args.models_dir, args.models_dir.rstrip("/") + "-photometric", args.model, images=3,
                rows_path=Path(tmp) / "e2e_rows.jsonl")
    if stage("timing"):
        from . import bench_timing

        result["timing"] = bench_timing.run(args.models_dir, args.model)
    emit(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
