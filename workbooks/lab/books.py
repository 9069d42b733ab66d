"""Builders of the research workbooks 02-07 and 09 (01 lives in ``lab.notebooks``).

Regenerate the ``.ipynb`` files with ``python -m lab.notebooks`` (``--check``
exits 1 when one is out of date); ``BUILDERS`` here joins its registry. Every notebook is thin: a papermill ``parameters``
cell, calls into ``lab``, a table and a plot. All run standalone (they start
their own serving + sidecars when ``endpoints`` is None) or under
``python -m lab.run_workbooks``, which passes the running stack's ``endpoints``.
"""

from __future__ import annotations

from typing import Callable

from .notebooks import notebook


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
            plots, model accuracies, benign cost, the timing side channel, adaptive attacks and the
            cost of hardening (06), the hit/miss distinguisher and the OARS-style attack (07). Each
            table records the profile that produced it. The paper's figures come from `lab.paper_tables`.
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


def build_06():
    return notebook([
        ("md", """
            # 06 · Adaptive attacks on the judgment layer, and the cost of hardening

            An adaptive attacker knows Algorithm 1 and shapes its queries around it. Each strategy
            wraps the unchanged One Pixel DE (untargeted: fitness = score of the true label,
            success = any other answer) as a `Predictor`, so the attack reaches the model only
            through the sidecar's gRPC API (`lab.adaptive`):

            * **plain**: one session, each population one `ClassifyBatch` (the paper's attacker);
            * **interleave** (a): an unrelated test image before every candidate in the same batch
              (decoy, cand, decoy, cand, ...): paper mode's single anchor is always the decoy;
            * **fresh_session** (b): every candidate its own call with a new session id, 16 calls in
              flight (`:c1`: one at a time, to separate the effect of concurrency);
            * **accounts** (c): 4 sessions share the attack, candidates round-robin;
            * **blinding** (d): every query a random transform of the candidate (shift with edge
              padding, brightness, Gaussian noise); `ensure` escalates the noise until the attacker's
              own hash check says the query passes the thresholds.

            Every cell (strategy, mode, pixels) runs against a FRESH sidecar with the flags of
            `off` (undefended reference), `paper` (`defended`) or `hardened` (`--mode hardened`),
            all with the paper's exact-score output, so no cell inherits another's sessions or
            cross-session memory. **asr**: the attacker's own verdict said success AND the model
            itself (`--mode off`) misclassifies the returned image; `asr_claimed` / `asr_model`
            are the two halves. HopSkipJump (ART, decision-based) runs plain and per-candidate
            fresh sessions. Only correctly classified test images are attacked.
        """),
        ("code", _src("""
            profile = "quick"
            models = None         # None: quick lenet; full lenet, resnet
            n_images = None       # images per cell (None: quick 8, full 100)
            pixels = None         # None: [1, 3, 5]
            hsj_images = None     # HopSkipJump images per cell (None: quick 3, full 50)
            seed = None
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, """
            import contextlib

            import numpy as np

            from lab import adaptive

            cfg = harness.config("adaptive", profile, models=models, n_images=n_images, pixels=pixels, seed=seed)
            cfg_h = harness.config("hsj", profile, models=models, n_images=hsj_images)
            cfg_c = harness.config("hardening_cost", profile)
            all_models = list(dict.fromkeys(cfg["models"] + cfg_h["models"] + [cfg_c["model"]]))
            stack = contextlib.ExitStack()
            ep = stack.enter_context(harness.connect(endpoints, models_dir, all_models, profile))
            cells = adaptive.onepixel_cells(cfg)
            print(f"{len(cells)} cells:", ", ".join(f"{c.label}@{c.mode}" for c in cells))
            cfg
        """)),
        ("md", "## One Pixel Attack under each strategy"),
        ("code", """
            import time

            t0 = time.perf_counter()
            rows, selection = [], {}
            for m in cfg["models"]:
                r, sel = adaptive.run_onepixel_cells(ep, m, x, y, cells, pixels=cfg["pixels"], n_images=cfg["n_images"],
                                                     popsize=cfg["popsize"], maxiter=cfg["maxiter"], seed=cfg["seed"],
                                                     decoy_pool=cfg["decoy_pool"], progress=progress)
                rows += r
                selection[m] = sel
            op_seconds = time.perf_counter() - t0
            print(f"{len(rows)} attacks in {op_seconds:.0f} s")
        """),
        ("md", "## HopSkipJump (decision-based, ART) through the sidecar"),
        ("code", """
            t0 = time.perf_counter()
            hsj_rows = []
            for m in cfg_h["models"]:
                hsj_rows += adaptive.run_hsj_cells(ep, m, x, y, adaptive.hsj_cells(cfg_h), n_images=cfg_h["n_images"],
                                                   max_iter=cfg_h["max_iter"], max_eval=cfg_h["max_eval"],
                                                   init_eval=cfg_h["init_eval"], init_size=cfg_h["init_size"],
                                                   budget=cfg_h["budget"], seed=cfg_h["seed"], progress=progress)
            hsj_seconds = time.perf_counter() - t0
            pd.DataFrame(hsj_rows).groupby(["strategy", "mode"])[
                ["success", "claimed_success", "queries", "forwarded", "l2"]].mean()
        """),
        ("md", "## Results: ASR per strategy, mode and pixels"),
        ("code", """
            table = adaptive.summarize(rows + hsj_rows, profile)
            pool = adaptive.pooled(rows + hsj_rows, profile)
            table.to_csv(report_dir / "adaptive_attacks.csv", index=False)
            pool.to_csv(report_dir / "adaptive_pooled.csv", index=False)
            pd.DataFrame(rows + hsj_rows).to_csv(report_dir / "adaptive_attempts.csv", index=False)
            pool
        """),
        ("code", """
            table[["strategy", "attack", "model", "pixels", "mode", "asr", "n", "mean_queries", "asr_claimed",
                   "forwarded_fraction", "cached_lookup_fraction"]]
        """),
        ("md", """
            ### Query blinding: what the transform costs

            Model accuracy on blinded CLEAN copies (before any attack), and the distances of the
            blinded images to the originals (L2 on the [0, 1] scale, Linf in intensity levels, hash
            bits, differing pixels). In the table above `asr_blinded`: the blinded verdict image
            fools the model; `asr`: the perturbation applied to the UN-blinded image does.
        """),
        ("code", """
            blind_cost = []
            for m in cfg["models"]:
                idx = np.array(sorted({r["image_index"] for r in rows if r["model"] == m}))
                for b in cfg["blinding"]:
                    blind_cost.append({"model": m, **adaptive.blinding_clean_cost(
                        ep, m, x, y, idx, adaptive.BlindSpec(**b), seed=cfg["seed"])})
            blind_cost = pd.DataFrame(blind_cost).assign(profile=profile)
            blind_cost.to_csv(report_dir / "blinding_cost.csv", index=False)
            blind_cost
        """),
        ("md", """
            ## Cost of hardening

            Fresh `paper` and `hardened` sidecars, three streams: the clean test images in one
            session; **many users**: users sending popular images (exact, or near-duplicates: 1-3
            changed pixels or a JPEG round trip) and their own images, interleaved in time;
            **poisoning**: an attacker session sends the adversarial images the undefended One
            Pixel runs found, then victims in other sessions send the clean originals. A cached
            answer is *false* when its label differs from the model's own label for the exact
            image sent (ground truth `--mode off`).
        """),
        ("code", """
            from lab.attacks import onepixel as op_mod

            m = cfg_c["model"]
            poison, seen = [], set()
            for r in sorted(rows, key=lambda r: r["pixels"]):
                if (r["model"] == m and r["strategy"] == "plain" and r["mode"] == "off" and r["success"]
                        and r["image_index"] not in seen):
                    seen.add(r["image_index"])
                    cand = np.array(json.loads(r["candidate"]))
                    poison.append((r["image_index"], op_mod.apply(x[r["image_index"]], cand[None])[0]))
            n_clean = len(x) if cfg_c["n_clean"] is None else min(cfg_c["n_clean"], len(x))
            cost, cost_requests = adaptive.hardening_cost(
                ep, m, x, y, modes=[("paper", "defended"), ("hardened", "hardened")], n_clean=n_clean,
                users=cfg_c["users"], popular=cfg_c["popular"], per_user=cfg_c["per_user"], seed=cfg_c["seed"],
                poison=poison)
            cost = pd.DataFrame(cost).assign(profile=profile)
            cost.to_csv(report_dir / "hardening_cost.csv", index=False)
            pd.DataFrame(cost_requests).to_csv(report_dir / "hardening_cost_requests.csv", index=False)
            cost
        """),
        ("md", "## Plots, acceptance check and provenance"),
        ("code", """
            import matplotlib.pyplot as plt

            op_pool = pool[pool.attack == "onepixel_untargeted"]
            fig = adaptive.bar_plot(op_pool, f"One Pixel, untargeted ({'/'.join(map(str, cfg['pixels']))} px pooled): "
                                             f"ASR by strategy and mode ({profile})")
            fig.savefig(report_dir / "06_adaptive.png", dpi=110)
            fig = adaptive.bar_plot(pool[pool.attack == "hopskipjump"], f"HopSkipJump ASR ({profile})")
            fig.savefig(report_dir / "06_hsj.png", dpi=110)
            fig, ax = plt.subplots(figsize=(7, 3.4))
            piv = cost.pivot(index="stream", columns="mode", values="false_cache_rate")
            piv.plot.bar(ax=ax, color={"paper": "#cc3311", "hardened": "#228833"}, rot=0)
            ax.set_ylabel("false cached answers / requests")
            ax.set_title(f"Cost of hardening ({cfg_c['model']}, {profile})", fontsize=10)
            fig.tight_layout()
            fig.savefig(report_dir / "06_hardening_cost.png", dpi=110)
        """),
        ("code", """
            def pooled_asr(strategy, mode):
                g = pool[(pool.strategy == strategy) & (pool["mode"] == mode) & (pool.attack == "onepixel_untargeted")]
                return float(g.asr.iloc[0]) if len(g) else float("nan")

            acceptance = {s: {"paper": pooled_asr(s, "paper"), "hardened": pooled_asr(s, "hardened"),
                              "hardened_lower": pooled_asr(s, "hardened") < pooled_asr(s, "paper")}
                          for s in ("interleave", "fresh_session")}
            for s, a in acceptance.items():
                print(f"{s}: paper {a['paper']:.3f}, hardened {a['hardened']:.3f} -> "
                      + ("hardened lower" if a["hardened_lower"] else "NOT lower (a finding, see the report)"))
        """),
        ("code", """
            full = harness.PROFILES["full"]
            fa, fh = full["adaptive"], full["hsj"]
            proj = {
                "onepixel": adaptive.projection(rows, runs_full=fa["n_images"] * len(fa["models"]),
                                                max_queries_full=fa["popsize"] * (fa["maxiter"] + 1) + 1,
                                                max_queries_quick=cfg["popsize"] * (cfg["maxiter"] + 1) + 1),
                "hopskipjump": adaptive.projection(hsj_rows, runs_full=fh["n_images"] * len(fh["models"]),
                                                   max_queries_full=fh["budget"], max_queries_quick=cfg_h["budget"]),
                "note": "from this run's seconds per sent image on this machine and model(s); the full profile "
                        "adds bigger models (slower per image): an order of magnitude, not a promise",
            }
            meta = harness.provenance(profile, {"adaptive": cfg, "hsj": cfg_h, "hardening_cost": cfg_c},
                                      selection=selection, sidecars=ep.config(),
                                      fresh_sidecars={n: adaptive.sidecar_flags(ep, n) for n in
                                                      sorted({c.sidecar for c in cells})},
                                      method=adaptive.__doc__, acceptance=acceptance, projection_full=proj,
                                      seconds={"onepixel": op_seconds, "hopskipjump": hsj_seconds},
                                      poison_pairs=len(poison),
                                      files=["adaptive_attacks.csv", "adaptive_pooled.csv", "adaptive_attempts.csv",
                                             "blinding_cost.csv", "hardening_cost.csv", "hardening_cost_requests.csv"])
            (report_dir / "adaptive.json").write_text(json.dumps(meta, indent=2, default=harness._json_default))
            stack.close()
            proj
        """),
    ], title="06 Adaptive attacks")


def build_07():
    return notebook([
        ("md", """
            # 07 · Side channels: is a cache hit observable, and can an attacker use it?

            **Distinguisher.** The attacker sends a clean image x, then a 1-pixel copy x'. Against a
            defended sidecar the second answer is a cache hit; against its `--mode off` twin (same
            output policy and noise key) a miss. From the two answers and the second call's latency
            a classifier predicts hit or miss (`lab.distinguisher`; hit and miss observations
            interleaved in time). Per output policy (exact scores, the default keyed noise, top-3,
            label only) x padding (`distribution` on / off), on fresh sidecar processes (one
            `python -m sidecar` per sidecar, as deployed: latencies depend on it). 0.5 = coin flip;
            n observations per class, so about +-0.1 around 0.5 is chance at the quick size.

            **OARS-style adaptive attack** (after Feng et al., CCS 2023). A score-based Linf Square
            Attack, one `Classify` per query in one session. The adaptive version asks a detector
            after every answer whether it was cached and, if so, resends the same candidate through a
            larger random transform (shift, then noise) until the answer is judged fresh. Detector
            `replay` (an answer byte-identical to an earlier one) is what a client can do; `oracle`
            (the sidecar's own counters) is an upper bound no client has. Success = the attacker
            confirmed a wrong label for the candidate itself AND the model misclassifies it.
        """),
        ("code", _src("""
            profile = "quick"
            model = None          # None: quick lenet, full resnet
            n = None              # distinguisher observations per class (None: quick 100, full 300)
            n_images = None       # OARS images per cell (None: quick 3, full 100)
            budget = None         # OARS queries per image (None: quick 250, full 10000)
            seed = None
        """, _COMMON_PARAMS), ("parameters",)),
        ("code", _src(_SETUP, """
            import contextlib
            import time

            import numpy as np

            from lab import adaptive, oars

            cfg_d = harness.config("distinguisher", profile, model=model, n=n, seed=seed)
            cfg_o = harness.config("oars", profile, model=model, n_images=n_images, budget=budget, seed=seed)
            stack = contextlib.ExitStack()
            ep = stack.enter_context(harness.connect(endpoints, models_dir, sorted({cfg_d["model"], cfg_o["model"]}),
                                                     profile))
            cfg_d, cfg_o
        """)),
        ("md", "## Distinguisher accuracy per output policy and padding"),
        ("code", """
            t0 = time.perf_counter()
            dist = oars.distinguisher_grid(ep, cfg_d["model"], x, harness.DISTINGUISHER_GRID, n=cfg_d["n"],
                                           warmup=cfg_d["warmup"], chunk=cfg_d["chunk"], paddings=cfg_d["paddings"],
                                           isolation=cfg_d["isolation"], seed=cfg_d["seed"], progress=progress)
            dist_seconds = time.perf_counter() - t0
            dist = pd.DataFrame(dist).assign(profile=profile)
            dist.to_csv(report_dir / "distinguisher.csv", index=False)
            dist[["policy", "padding", "hit_mode", "n_hits", "accuracy", "rule_accuracy", "content_accuracy",
                  "timing_accuracy", "median_hit_latency_ms", "median_miss_latency_ms"]]
        """),
        ("code", """
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(11, 4.2))
            labels = [f"{r.policy}\\n{r.hit_mode}, pad {r.padding}" for r in dist.itertuples()]
            xs = np.arange(len(dist))
            ax.bar(xs - 0.2, dist["accuracy"], 0.4, label="content + timing", color="#cc3311")
            ax.bar(xs + 0.2, dist["content_accuracy"], 0.4, label="content only", color="#999933")
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
            ax.set_xticks(xs, labels, fontsize=7, rotation=30, ha="right")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("distinguisher accuracy")
            ax.set_title(f"Hit/miss distinguisher ({cfg_d['model']}, {profile}; 0.5 = coin flip)", fontsize=10)
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            fig.savefig(report_dir / "07_distinguisher.png", dpi=110)
        """),
        ("md", "## OARS-style adaptive attack"),
        ("code", """
            ocells = []
            for pol in cfg_o["policies"]:
                ocells.append(oars.OarsCell("off", pol, harness.MODE_SIDECARS[("off", pol)], "square"))
                for mode in ("paper", "hardened"):
                    sc = harness.MODE_SIDECARS[(mode, pol)]
                    ocells.append(oars.OarsCell(mode, pol, sc, "square"))
                    ocells += [oars.OarsCell(mode, pol, sc, "square+oars", d) for d in cfg_o["detectors"]]
            t0 = time.perf_counter()
            orows = oars.run_oars(ep, cfg_o["model"], x, y, ocells, n_images=cfg_o["n_images"], budget=cfg_o["budget"],
                                  eps=cfg_o["eps"], p_init=cfg_o["p_init"], max_resamples=cfg_o["max_resamples"],
                                  seed=cfg_o["seed"], progress=progress)
            oars_seconds = time.perf_counter() - t0
            otable = oars.summarize_oars(orows, profile)
            otable.to_csv(report_dir / "oars.csv", index=False)
            pd.DataFrame(orows).to_csv(report_dir / "oars_attempts.csv", index=False)
            otable[["mode", "policy", "attack", "asr", "n", "asr_claimed", "asr_model", "mean_queries",
                    "forwarded_fraction", "detected_hit_fraction", "true_cached_fraction", "mean_ladder_level"]]
        """),
        ("code", """
            plot_table = otable.assign(cell=otable.policy + "\\n" + otable.attack)
            fig = adaptive.bar_plot(plot_table, f"Square Attack vs OARS-style resampling: ASR within "
                                                f"{cfg_o['budget']} queries ({profile})", group="cell")
            fig.savefig(report_dir / "07_oars.png", dpi=110)
            target = otable[(otable["mode"] == "hardened") & (otable.policy == "scores_default")]
            print("hardened + default policy, ASR per attack:", dict(zip(target.attack, target.asr)),
                  "(goal for the full profile: <= 0.05 within 10,000 queries)")
        """),
        ("code", """
            full_o = harness.PROFILES["full"]["oars"]
            per_query = float(sum(r["seconds"] for r in orows) / max(1, sum(r["queries"] for r in orows)))
            n_cells_full = len(full_o["policies"]) * (1 + 2 * (1 + len(full_o["detectors"])))
            proj = {"measured_seconds_per_query": per_query, "cells_full": n_cells_full,
                    "projected_hours_upper": per_query * n_cells_full * full_o["n_images"] * full_o["budget"] / 3600,
                    "note": "every image using the whole budget; measured on this machine and model"}
            meta = harness.provenance(profile, {"distinguisher": cfg_d, "oars": cfg_o}, sidecars=ep.config(),
                                      fresh_sidecars={n: adaptive.sidecar_flags(ep, n) for n in
                                                      sorted({c.sidecar for c in ocells})},
                                      method=oars.__doc__, ladder=oars.LADDER, projection_full=proj,
                                      seconds={"distinguisher": dist_seconds, "oars": oars_seconds})
            (report_dir / "distinguisher.json").write_text(json.dumps(
                {**meta, "grid": harness.DISTINGUISHER_GRID, "results": dist.to_dict("records")}, indent=2,
                default=harness._json_default))
            (report_dir / "oars.json").write_text(json.dumps({**meta, "results": otable.to_dict("records")}, indent=2,
                                                             default=harness._json_default))
            stack.close()
            proj
        """),
    ], title="07 Side channels")


BUILDERS: dict[str, Callable] = {
    "02_jsma.ipynb": build_02,
    "03_onepixel.ipynb": build_03,
    "04_benign_cost.ipynb": build_04,
    "05_timing.ipynb": build_05,
    "06_adaptive.ipynb": build_06,
    "07_side_channels.ipynb": build_07,
    "09_report.ipynb": build_09,
}
