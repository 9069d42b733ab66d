"""Builders of the research workbooks 02-05 and 09 (01 lives in ``lab.notebooks``).

Regenerate the ``.ipynb`` files with ``python -m lab.books`` (``--check`` exits 1
when one is out of date). Every notebook is thin: a papermill ``parameters``
cell, calls into ``lab``, a table and a plot. All run standalone (they start
their own serving + sidecars when ``endpoints`` is None) or under
``python -m lab.run_workbooks``, which passes the running stack's ``endpoints``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .notebooks import WORKBOOKS, notebook, write


def _src(*parts: str) -> str:
    """Join code fragments written at different indentations into one cell source."""
    import textwrap

    return "\n".join(textwrap.dedent(p).strip("\n") for p in parts)

_COMMON_PARAMS = '''
    models_dir = "models"
    report_dir = "reports"
    endpoints = None      # JSON of a running stack (lab.run_workbooks passes it); None: start one here
    progress = True
'''

_SETUP = '''
    import json
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from lab import harness, report
    from lab.notebooks import project_path

    models_dir, report_dir = project_path(models_dir), project_path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    x, y, source = harness.load_test_set()
    print(f"profile {profile}; CIFAR-10 test images: {len(x)} from {os.path.basename(str(source))}")
'''


def build_02():
    return notebook([
        ("md", """
            # 02 · JSMA through the sidecar (Table 1)

            White-box gradients, black-box verdicts: the attacker computes saliency maps on its own
            copy of the exported model, but every "did it work yet" check and the final verdict are
            `Classify` calls to the sidecar, one attacker session per (model, theta, defense) run.
            *Without defense* = sidecar `--mode off`, *with defense* = `--mode paper`; same images,
            targets and settings in both columns.

            **theta** (the paper's perturbation per feature) is ART's `theta` on the [0, 1] scale:
            every step adds `round(255·theta)` intensity levels to the two most salient features.
            **gamma** (maximum fraction of modified features, not a paper parameter) is fixed per
            profile; `max_iter` caps iterations in the quick profile. Only test images the model
            classifies correctly are attacked; target = a random wrong label.
        """),
        ("code", _src("""
            profile = "quick"     # "quick" (CI, minutes on CPU) or "full" (the paper's sizes)
            models = None         # None: the profile's models (quick: cnn, lenet; full: cnn, lenet, resnet)
            thetas = None         # None: [0.1, 0.2, 0.3, 0.4]
            n_images = None       # None: quick 5, full 500
            gamma = None          # None: the profile's (0.1)
            max_iter = None       # None: the profile's (quick 40, full no cap); -1: no cap
            seed = None
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, '''
    cfg = harness.config("jsma", profile, models=models, thetas=thetas, n_images=n_images, gamma=gamma,
                         max_iter=max_iter, seed=seed)
    if cfg["max_iter"] is not None and cfg["max_iter"] < 0:
        cfg["max_iter"] = None
    cfg
''')),
        ("md", "## Attack"),
        ("code", """
            rows, selection = [], {}
            with harness.connect(endpoints, models_dir, cfg["models"], profile) as ep:
                for m in cfg["models"]:
                    r, sel = harness.run_jsma(ep, m, x, y, thetas=cfg["thetas"], n_images=cfg["n_images"],
                                              gamma=cfg["gamma"], max_iter=cfg["max_iter"], seed=cfg["seed"],
                                              progress=progress)
                    rows += r
                    selection[m] = sel
            attempts = pd.DataFrame(rows)
            attempts.groupby(["model", "theta", "defense"])[
                ["success", "queries", "pixels_changed", "hash_distance", "pixel_distance"]].mean()
        """),
        ("md", "## Table 1, ours beside the paper's"),
        ("code", """
            table = harness.summarize(rows, "jsma", profile=profile, models_dir=models_dir, selection=selection,
                                      settings={k: cfg[k] for k in ("gamma", "max_iter", "n_images")})
            harness.write_results(report_dir, "jsma", rows, table, profile=profile, settings=cfg,
                                  selection=selection,
                                  extra={"method": harness.METHODS["jsma"], "sidecars": ep.config()})
            report.comparison("jsma", table)
        """),
        ("code", """
            fig = report.bar_plot(table, "theta", f"JSMA ASR ({profile} profile; paper hatched)", "jsma")
            fig.savefig(report_dir / "02_jsma.png", dpi=110)
        """),
    ], title="02 JSMA")


def build_03():
    return notebook([
        ("md", """
            # 03 · One Pixel Attack through the sidecar (Tables 2 and 3)

            Differential evolution over (x, y, r, g, b) tuples (best1bin, mutation in (0.5, 1),
            recombination 1; paper size: population 400, up to 75 generations), each population sent
            as one `ClassifyBatch` (judged in order within the attacker's session), stopping at the
            first success. One attacker session per (model, pixels, defense) run.

            * **Targeted** (Table 2): one random wrong label per image; success when the answer is it.
            * **Untargeted** (Table 3): the paper's "100 images trying to perform all labels": the DE
              runs towards each wrong label in turn; an attempt succeeds when the answer differs from
              the true label, an image when any attempt did.

            Only correctly classified test images are attacked. Both columns use the same images,
            targets and DE seeds, so they differ only by the defense.
        """),
        ("code", _src("""
            profile = "quick"
            models = None               # None: quick lenet, resnet; full the six zoo models
            pixels = None               # None: [1, 3, 5]
            n_images_targeted = None    # None: quick 5, full 500
            n_images_untargeted = None  # None: quick 3, full 100
            targets_per_image = None    # untargeted attempts per image (None = all 9 wrong labels)
            popsize = None              # None: quick 40, full 400
            maxiter = None              # None: quick 5, full 75
            seed = None
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, '''
    common = dict(models=models, pixels=pixels, popsize=popsize, maxiter=maxiter, seed=seed)
    cfg_t = harness.config("onepixel_targeted", profile, n_images=n_images_targeted, **common)
    cfg_u = harness.config("onepixel_untargeted", profile, n_images=n_images_untargeted,
                           targets_per_image=targets_per_image, **common)
    all_models = list(dict.fromkeys(cfg_t["models"] + cfg_u["models"]))
    cfg_t, cfg_u
''')),
        ("md", "## Attacks"),
        ("code", """
            results = {}
            with harness.connect(endpoints, models_dir, all_models, profile) as ep:
                for section, cfg in (("onepixel_targeted", cfg_t), ("onepixel_untargeted", cfg_u)):
                    rows, selection = [], {}
                    for m in cfg["models"]:
                        r, sel = harness.run_onepixel(
                            ep, m, x, y, targeted=section == "onepixel_targeted", pixels=cfg["pixels"],
                            n_images=cfg["n_images"], popsize=cfg["popsize"], maxiter=cfg["maxiter"],
                            seed=cfg["seed"], targets_per_image=cfg.get("targets_per_image"), progress=progress)
                        rows += r
                        selection[m] = sel
                    table = harness.summarize(rows, section, profile=profile, models_dir=models_dir,
                                              selection=selection,
                                              settings={k: cfg[k] for k in ("popsize", "maxiter", "n_images")})
                    harness.write_results(report_dir, section, rows, table, profile=profile, settings=cfg,
                                          selection=selection,
                                          extra={"method": harness.METHODS[section], "sidecars": ep.config()})
                    results[section] = (rows, table)
        """),
        ("md", "## Table 2: targeted, ours beside the paper's"),
        ("code", """
            report.comparison("onepixel_targeted", results["onepixel_targeted"][1])
        """),
        ("code", """
            fig = report.bar_plot(results["onepixel_targeted"][1], "pixels",
                                  f"One Pixel Attack, targeted ({profile}; paper hatched)", "onepixel_targeted")
            fig.savefig(report_dir / "03_onepixel_targeted.png", dpi=110)
        """),
        ("md", "## Table 3: untargeted, ours beside the paper's"),
        ("code", """
            report.comparison("onepixel_untargeted", results["onepixel_untargeted"][1])
        """),
        ("code", """
            fig = report.bar_plot(results["onepixel_untargeted"][1], "pixels",
                                  f"One Pixel Attack, untargeted ({profile}; paper hatched)", "onepixel_untargeted")
            fig.savefig(report_dir / "03_onepixel_untargeted.png", dpi=110)
        """),
        ("code", """
            attempts = pd.DataFrame(results["onepixel_untargeted"][0] + results["onepixel_targeted"][0])
            attempts.groupby(["attack", "model", "pixels", "defense"])[["success", "queries", "generations"]].mean()
        """),
    ], title="03 One Pixel Attack")


def build_04():
    return notebook([
        ("md", """
            # 04 · Benign cost of the defense

            The clean test set, in order, streamed image by image through ONE session of the
            defended sidecar (`--mode paper`) and one of the undefended one (`--mode off`).
            Accuracy both ways, the fraction of answers that came from the cache, and how many
            cached answers were wrong. Whether an answer was cached is not visible to clients: it is
            read from the sidecar's Prometheus counters before/after every request.
        """),
        ("code", _src("""
            profile = "quick"
            models = None         # None: quick lenet; full every zoo model
            n_images = None       # None: quick 200, full the whole test set
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, '''
    from lab import benign

    cfg = harness.config("benign", profile, models=models, n_images=n_images)
    n = len(x) if cfg["n_images"] is None else min(cfg["n_images"], len(x))
    cfg
''')),
        ("code", """
            summaries, per_image = [], []
            with harness.connect(endpoints, models_dir, cfg["models"], profile) as ep:
                for m in cfg["models"]:
                    s, arrays = benign.run(ep, m, x[:n], y[:n], progress=progress)
                    s.update(harness.model_info(models_dir, m))
                    s["profile"] = profile
                    summaries.append(s)
                    per_image.append(benign.per_image_frame(m, range(n), y[:n], arrays))
            table = pd.DataFrame(summaries)
            table.to_csv(report_dir / "benign_cost.csv", index=False)
            pd.concat(per_image).to_csv(report_dir / "benign_per_image.csv", index=False)
            meta = harness.provenance(profile, cfg, ground_truth=benign.GROUND_TRUTH, n_images=n, sidecars=ep.config())
            (report_dir / "benign_cost.json").write_text(json.dumps({**meta, "results": summaries}, indent=2))
            table
        """),
        ("code", """
            import matplotlib.pyplot as plt
            import numpy as np

            fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(table) + 2), 3.5))
            xs = np.arange(len(table))
            ax.bar(xs - 0.27, table["accuracy_without_defense"], 0.27, label="accuracy, no defense", color="#4477aa")
            ax.bar(xs, table["accuracy_with_defense"], 0.27, label="accuracy, defense", color="#cc3311")
            ax.bar(xs + 0.27, table["cached_fraction"], 0.27, label="answered from cache", color="#999933")
            ax.set_xticks(xs, table["model"])
            ax.set_ylim(0, 1)
            ax.set_title(f"Benign cost ({profile} profile, {n} clean test images)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(report_dir / "04_benign_cost.png", dpi=110)
        """),
    ], title="04 Benign cost")


def build_05():
    return notebook([
        ("md", """
            # 05 · Timing side channel

            Does a cached answer come back faster than a forwarded one? In one session per padding
            setting the attacker alternates fresh test images (forwarded) and one-pixel changes of
            them (answered from the cache) and times each unary `Classify` on the client. Ground truth
            per request from the sidecar's Prometheus counters. Padding `off` vs the time layer
            (`distribution`: cached answers held for a latency drawn from recent forwards; `fixed`:
            every answer held to a fixed target). Two-sample Kolmogorov-Smirnov test per setting and
            the best single-threshold classifier an attacker could build (0.5 = no leak).
        """),
        ("code", _src("""
            profile = "quick"
            model = None          # None: quick lenet, full resnet
            n = None              # timed requests per padding setting (None: quick 200, full 2000)
            warmup = None         # untimed fresh images first (fills the padding's latency model)
            paddings = None       # None: ["off", "distribution", "fixed"]
            seed = None
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, '''
    import numpy as np

    from lab import timing

    cfg = harness.config("timing", profile, model=model, n=n, warmup=warmup, paddings=paddings, seed=seed)
    cfg
''')),
        ("code", """
            rng = np.random.default_rng(cfg["seed"])
            frames, results = [], []
            with harness.connect(endpoints, models_dir, [cfg["model"]], profile) as ep:
                for pad in cfg["paddings"]:
                    name = harness.PADDING_SIDECARS[pad]
                    with ep.predictor(name, cfg["model"], session_id=f"timing-{pad}-{rng.integers(1 << 30)}",
                                      batch=False) as p:
                        warm, _, _ = timing.probe_images(x, 2 * cfg["warmup"], rng)
                        timing.measure(p, ep.metrics(name), cfg["model"], warm[::2], progress=False)
                        images, expected, src = timing.probe_images(x, cfg["n"], rng)
                        res = timing.measure(p, ep.metrics(name), cfg["model"], images, progress=progress,
                                             desc=f"timing {pad}")
                    frames.append(pd.DataFrame({"padding": pad, "request": np.arange(len(images)),
                                                "image_index": src, "expected_cached": expected,
                                                "cached": res["cached"], "latency_s": res["latency_s"]}))
                    results.append({"padding": pad, "sidecar": name, **timing.analyse(res["latency_s"], res["cached"])})
            latencies = pd.concat(frames, ignore_index=True)
            latencies.to_csv(report_dir / "timing_latencies.csv", index=False)
            meta = harness.provenance(profile, cfg, model=cfg["model"], ground_truth=timing.GROUND_TRUTH,
                                      sidecars=ep.config())
            (report_dir / "timing.json").write_text(json.dumps({**meta, "results": results}, indent=2))
            pd.DataFrame(results)
        """),
        ("code", """
            fig = timing.histogram(latencies, title=f"Client-side latency, cached vs forwarded "
                                                   f"({cfg['model']}, {profile} profile)")
            fig.savefig(report_dir / "timing_hist.png", dpi=110)
        """),
    ], title="05 Timing side channel")


def build_09():
    return notebook([
        ("md", """
            # 09 · Report

            Gathers the workbooks' result files under `report_dir` and renders
            `report_dir/report.html` (self-contained): the paper's Tables 1-3 beside ours with bar
            plots, model accuracies, benign cost and the timing side channel. Each table records the
            profile that produced it. The paper's figures come from `lab.paper_tables`.
        """),
        ("code", """
            profile = "quick"     # informational: each result file records its own profile
            report_dir = "reports"
        """, ("parameters",)),
        ("code", """
            import matplotlib

            matplotlib.use("Agg")
            from lab import report
            from lab.notebooks import project_path

            report_dir = project_path(report_dir)
            g = report.gather(report_dir)
            report.profiles_used(g)
        """),
        ("code", """
            for sec in report.SECTIONS:
                comp = g["sections"][sec]["comparison"]
                print(sec, "missing" if comp is None else f"{len(comp)} rows")
                if comp is not None:
                    display(comp)
        """),
        ("code", """
            out = report.render(report_dir)
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
        """),
    ], title="09 Report")


BUILDERS: dict[str, Callable] = {
    "02_jsma.ipynb": build_02,
    "03_onepixel.ipynb": build_03,
    "04_benign_cost.ipynb": build_04,
    "05_timing.ipynb": build_05,
    "09_report.ipynb": build_09,
}


def build_all(dest: str | Path = WORKBOOKS, names=None) -> list[Path]:
    return [write(BUILDERS[n](), Path(dest) / n) for n in (names or BUILDERS)]


def stale(dest: str | Path = WORKBOOKS) -> list[str]:
    import nbformat

    out = []
    for n, builder in BUILDERS.items():
        path = Path(dest) / n
        if not path.exists() or path.read_text(encoding="utf-8") != nbformat.writes(builder()) + "\n":
            out.append(n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.books", description="Regenerate workbooks 02-05, 09.")
    ap.add_argument("--check", action="store_true", help="only report notebooks that are out of date")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        print("out of date: " + ", ".join(bad) if bad else "all workbooks up to date")
        return 1 if bad else 0
    for p in build_all(names=args.names or None):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
