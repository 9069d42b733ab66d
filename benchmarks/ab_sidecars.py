"""Two builds of the sidecar in ONE interleaved run: this checkout's and another
checkout's (``--base DIR``, e.g. ``git worktree add --detach ../base <commit>``), beside
direct calls and the no-op proxy, call by call (``bench_sidecar.overhead``). On a shared
host the load moves between runs; within one run it hits every path alike, so the
before/after ratios of a change come from here.

    python -m benchmarks.ab_sidecars --base ../base --out reports/ab.json \\
        [--extra nonoise=--score-noise,0,--score-precision,0 off0=--mode,off,--score-noise,0,--score-precision,0]

``--extra NAME=FLAG,FLAG`` adds sidecars of this checkout with further flags. Every
sidecar runs paper mode, padding off, one BLAS thread. Prints each path's overhead over
the no-op proxy, CPU per call and throughput as ratios to the no-op proxy's, and writes
the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from lab.cifar10 import load_cifar10
from lab.launcher import Lab, Process, SidecarSpec, free_port
from sidecar import BLAS_THREAD_VARS

from . import bench_sidecar

REPO = Path(__file__).resolve().parents[1]


class _Checkout:
    """``python -m sidecar`` of the checkout at ``tree`` (its ``sidecar`` package first on the path)."""

    def __init__(self, name: str, tree: Path, backend: str, args: tuple[str, ...] = ()) -> None:
        port, mport = free_port(), free_port()
        spec = SidecarSpec(name, mode="paper", padding="off", args=args)
        runner = (f"import sys; sys.path.insert(0, {str(tree)!r}); import runpy; "
                  "runpy.run_module('sidecar', run_name='__main__', alter_sys=True)")
        log = Path(tempfile.mkdtemp(prefix="hashguard-ab-")) / f"{name}.log"
        self._proc = Process(name, [sys.executable, "-c", runner, *spec.flags(backend, port, mport)],
                             f"127.0.0.1:{port}", log, env={v: "1" for v in BLAS_THREAD_VARS}).start()
        self.address = self._proc.address

    def stop(self) -> None:
        self._proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_sidecars")
    ap.add_argument("--base", required=True, help="another checkout of this repository (the 'before')")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=FLAG,FLAG: more sidecars of this checkout")
    ap.add_argument("--out", default="reports/ab.json")
    args = ap.parse_args()
    images = load_cifar10().x_test
    with Lab(args.models_dir, [args.model]) as st:
        builds = {"new": (REPO, ()), "base": (Path(args.base).resolve(), ())}
        for item in args.extra:
            name, _, flags = item.partition("=")
            builds[name] = (REPO, tuple(flags.split(",")) if flags else ())
        try:
            for name, (tree, flags) in builds.items():
                st.sidecars[name] = _Checkout(name, tree, st.backend, flags)
            ov = bench_sidecar.overhead(st, args.model, images, args.n, args.seconds, rounds=args.rounds,
                                        sidecars=tuple(builds))
        finally:
            for name in builds:
                if name in st.sidecars:
                    st.sidecars[name].stop()
    floor = ov["noop_proxy"]
    ov["vs_noop_proxy"] = {}
    for name in builds:
        r = ov[name]
        ov["vs_noop_proxy"][name] = row = {
            "overhead_p50_ms_over_noop": round(r["overhead_p50_ms"] - floor["overhead_p50_ms"], 4),
            "cpu_ratio": round(r["sidecar_cpu_ms_per_call"] / floor["sidecar_cpu_ms_per_call"], 3),
            "throughput_ratio": round(r["throughput_ratio"] / floor["throughput_ratio"], 3)}
        print(f"{name}: p50 {row['overhead_p50_ms_over_noop']:+.3f} ms over the no-op proxy, "
              f"CPU per call x{row['cpu_ratio']}, throughput x{row['throughput_ratio']} of the no-op proxy's")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(ov, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
