"""Gather the workbooks' results and render ``report.html``.

Inputs, all under the reports directory (written by the workbooks):
``models.csv`` (training), ``table1_jsma.csv``, ``table2_onepixel_targeted.csv``,
``table3_onepixel_untargeted.csv`` with their ``<section>.json`` provenance,
``benign_cost.csv``/``.json``, ``timing.json``/``timing_latencies.csv``,
``adaptive_attacks.csv``/``adaptive_pooled.csv``/``adaptive.json``/``blinding_cost.csv``/
``hardening_cost.csv`` (06) and ``distinguisher.csv``/``.json``, ``oars.csv``/``.json`` (07).
The paper's numbers come from ``lab.paper_tables`` (data in the repository).
Nothing here computes or edits a figure: tables are the workbooks' outputs set
beside the paper's. Missing inputs are reported as missing, not invented.

The HTML is self-contained (plots embedded as PNG data URIs).
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import paper_tables
from .harness import FILES, PAPER_COLUMNS

SECTIONS = ("jsma", "onepixel_targeted", "onepixel_untargeted")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table.data{border-collapse:collapse;font-size:.82em;margin:.6em 0}
table.data th,table.data td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
table.data th{background:#f2f2f2}table.data td:first-child{text-align:left}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em;margin:1em 0}
.missing{color:#a00}.prov{font-size:.8em;color:#555}img{max-width:100%}
"""


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.exists() else None


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def comparison(section: str, ours):
    """Our table merged with the paper's on (model, parameter): side-by-side columns."""
    param = PAPER_COLUMNS[section][1]
    paper = paper_tables.frame(section).rename(columns={
        "asr_without_defense": "paper_asr_without_defense", "asr_with_defense": "paper_asr_with_defense"})
    keep = [c for c in ["model", param, "asr_without_defense", "asr_with_defense",
                        "n_images_without_defense", "n_images_with_defense",
                        "asr_attempts_without_defense", "asr_attempts_with_defense",
                        "model_test_accuracy", "selection_accuracy", "profile"] if c in ours.columns]
    merged = ours[keep].merge(paper, on=["model", param], how="left")
    merged["paper_model_accuracy"] = merged["model"].map(paper_tables.PAPER_MODEL_ACCURACY)
    order = ["model", param, "paper_asr_without_defense", "paper_asr_with_defense",
             "asr_without_defense", "asr_with_defense"]
    return merged[order + [c for c in merged.columns if c not in order]]


def bar_plot(table, param: str, title: str, section: str | None = None):
    """Grouped bars: our ASR without/with defense, and the paper's (hatched) when ``section`` given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [f"{m}\n{param}={p}" for m, p in zip(table["model"], table[param])]
    xs = np.arange(len(labels))
    series = [("ours, no defense", table["asr_without_defense"], "#4477aa", None),
              ("ours, defense", table["asr_with_defense"], "#cc3311", None)]
    if section is not None:
        paper = paper_tables.frame(section)
        merged = table[["model", param]].merge(paper, on=["model", param], how="left")
        series += [("paper, no defense", merged["asr_without_defense"], "#4477aa", "//"),
                   ("paper, defense", merged["asr_with_defense"], "#cc3311", "//")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels) + 2), 3.8))
    for j, (name, vals, color, hatch) in enumerate(series):
        ax.bar(xs + (j - (len(series) - 1) / 2) * width, np.asarray(vals, float), width, label=name,
               color=color, alpha=0.4 if hatch else 0.9, hatch=hatch, edgecolor="black", linewidth=0.3)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attack success rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_file(path: Path, alt: str) -> str:
    """An existing PNG of the workbooks, embedded; empty when absent."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{data}'>"


def _table_html(df, floatfmt: str = "{:.3f}") -> str:
    def fmt(v: float) -> str:
        if float(v).is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        return floatfmt.format(v)

    return df.to_html(index=False, classes="data", border=0, na_rep="–", float_format=fmt)


def _esc(s) -> str:
    return html.escape(str(s))


def gather(reports_dir: str | Path) -> dict:
    """Everything the report shows, as DataFrames/dicts (None where missing)."""
    rd = Path(reports_dir)
    out: dict = {"models": _read_csv(rd / "models.csv"), "sections": {}}
    for sec in SECTIONS:
        table = _read_csv(rd / FILES[sec][1])
        out["sections"][sec] = {
            "table": table,
            "comparison": comparison(sec, table) if table is not None and len(table) else None,
            "meta": _read_json(rd / f"{sec}.json"),
        }
    out["benign"] = _read_csv(rd / "benign_cost.csv")
    out["benign_meta"] = _read_json(rd / "benign_cost.json")
    out["timing"] = _read_json(rd / "timing.json")
    out["timing_latencies"] = _read_csv(rd / "timing_latencies.csv")
    # workbooks 06 and 07
    out["adaptive"] = _read_csv(rd / "adaptive_attacks.csv")
    out["adaptive_pooled"] = _read_csv(rd / "adaptive_pooled.csv")
    out["adaptive_meta"] = _read_json(rd / "adaptive.json")
    out["blinding_cost"] = _read_csv(rd / "blinding_cost.csv")
    out["hardening_cost"] = _read_csv(rd / "hardening_cost.csv")
    out["distinguisher"] = _read_csv(rd / "distinguisher.csv")
    out["distinguisher_meta"] = _read_json(rd / "distinguisher.json")
    out["oars"] = _read_csv(rd / "oars.csv")
    out["oars_meta"] = _read_json(rd / "oars.json")
    return out


def profiles_used(g: dict) -> dict[str, str]:
    """Which profile produced each result (from the files themselves)."""
    used = {}
    if g["models"] is not None and "profile" in g["models"]:
        used["models"] = ", ".join(sorted(set(map(str, g["models"]["profile"].dropna()))))
    for sec, d in g["sections"].items():
        if d["table"] is not None and "profile" in d["table"]:
            used[sec] = ", ".join(sorted(set(map(str, d["table"]["profile"]))))
    if g["benign"] is not None and "profile" in g["benign"]:
        used["benign"] = ", ".join(sorted(set(map(str, g["benign"]["profile"]))))
    if g["timing"] is not None:
        used["timing"] = str(g["timing"].get("profile"))
    for key in ("adaptive", "hardening_cost", "distinguisher", "oars"):
        if g.get(key) is not None and "profile" in g[key]:
            used[key] = ", ".join(sorted(set(map(str, g[key]["profile"]))))
    return used


def render(reports_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: in ``reports_dir``) and return its path."""
    from .timing import histogram

    rd = Path(reports_dir)
    out = Path(out) if out else rd / "report.html"
    g = gather(rd)
    used = profiles_used(g)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hashguard research report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>hashguard: perceptual-hash defense, reproduced</h1>",
             f"<p class='prov'>Generated {datetime.now(timezone.utc).replace(microsecond=0).isoformat()} "
             f"from {_esc(rd.resolve())}.</p>"]
    parts.append("<h2>Profiles</h2><p>Which workbook profile produced each result "
                 "(<code>quick</code>: CI smoke run with small models and few images; "
                 "<code>full</code>: the paper's sizes):</p>")
    if used:
        import pandas as pd

        parts.append(_table_html(pd.DataFrame([{"result": k, "profile": v} for k, v in used.items()])))
    else:
        parts.append("<p class='missing'>No results found.</p>")
    if any("quick" in v for v in used.values()):
        parts.append("<div class='note'><b>Quick profile.</b> Results marked <code>quick</code> come from "
                     "small models trained for a few epochs on CPU and a handful of images with capped "
                     "attack budgets. They exercise the pipeline; they are not estimates of the paper's "
                     "figures.</div>")
    parts.append(
        "<div class='note'><b>How to read the tables.</b> Both of our columns are measured by the same "
        "black-box harness through the sidecar's gRPC API: <i>without defense</i> through a sidecar with "
        "<code>--mode off</code>, <i>with defense</i> through one with <code>--mode paper</code>, on the same "
        "served model, images, targets and random seeds; one attacker session per (model, parameter, defense) "
        "run. As in the paper, responses carry the model's exact scores (the sidecar's optional score "
        "rounding and keyed score noise are switched off for these experiments). "
        "ASR = successful attacks / attacked images. Only test images the model classified correctly "
        "(through the undefended path) are attacked; images it already misclassifies are excluded. "
        "Our data and training budget differ from the paper's (see the model table: training-set size, "
        "epochs, accuracy), so absolute numbers are not expected to match; the paper's figures are shown "
        "beside ours for reference, copied from the paper. Undefended columns are reported as measured.</div>")

    # Models
    parts.append("<h2>Models</h2>")
    if g["models"] is not None:
        parts.append(_table_html(g["models"], "{:.4g}"))
        parts.append(_png_file(rd / "01_models.png", "model accuracy and size"))
    else:
        parts.append("<p class='missing'>reports/models.csv not found (training workbook not run).</p>")

    # Attack tables
    for sec in SECTIONS:
        d = g["sections"][sec]
        param = PAPER_COLUMNS[sec][1]
        parts.append(f"<h2>{_esc(paper_tables.TITLES[sec])}</h2>")
        if d["comparison"] is None:
            parts.append(f"<p class='missing'>{_esc(FILES[sec][1])} not found.</p>")
            continue
        meta = d["meta"] or {}
        parts.append(f"<p class='prov'>profile: <b>{_esc(used.get(sec, '?'))}</b>; settings: "
                     f"<code>{_esc(json.dumps(meta.get('settings', {})))}</code></p>")
        if meta.get("method"):
            parts.append(f"<p>{_esc(meta['method'])}</p>")
        parts.append(_table_html(d["comparison"]))
        fig = bar_plot(d["table"], param, paper_tables.TITLES[sec] + " (ours solid, paper hatched)", sec)
        parts.append(f"<img alt='{_esc(sec)} bar plot' src='{_png(fig)}'>")

    # Benign
    parts.append("<h2>Benign cost</h2>")
    if g["benign"] is not None:
        bm = g["benign_meta"] or {}
        parts.append("<p>The clean test images streamed one by one through one session of each sidecar. "
                     "<i>cached_wrong</i>: answers taken from the cache that were wrong; "
                     "<i>cached_wrong_model_right</i>: of those, images the model itself classifies correctly "
                     f"(errors the defense introduced). Cache ground truth: {_esc(bm.get('ground_truth', ''))}.</p>")
        shown = g["benign"].drop(columns=[c for c in ("ground_truth", "seconds") if c in g["benign"].columns])
        parts.append(_table_html(shown, "{:.4g}"))
        parts.append(_png_file(rd / "04_benign_cost.png", "benign cost"))
    else:
        parts.append("<p class='missing'>benign_cost.csv not found.</p>")

    # Timing
    parts.append("<h2>Timing side channel</h2>")
    if g["timing"] is not None and g["timing_latencies"] is not None:
        import pandas as pd

        t = g["timing"]
        parts.append(f"<p>Model <code>{_esc(t.get('model'))}</code>, profile <b>{_esc(t.get('profile'))}</b>. "
                     "The attacker alternates fresh images (forwarded) and one-pixel changes (cached) in one "
                     "session per padding setting and times each unary Classify on the client. "
                     "KS: two-sample Kolmogorov-Smirnov test of cached vs forwarded latencies; "
                     "threshold accuracy: best balanced accuracy of telling them apart by one latency "
                     f"threshold (0.5 = no leak). Ground truth: {_esc(t.get('ground_truth', ''))}.</p>")
        parts.append(_table_html(pd.DataFrame(t["results"]), "{:.4g}"))
        fig = histogram(g["timing_latencies"])
        parts.append(f"<img alt='latency histogram' src='{_png(fig)}'>")
    else:
        parts.append("<p class='missing'>timing.json / timing_latencies.csv not found.</p>")

    parts += _adaptive_sections(g, rd)
    parts += _side_channel_sections(g, rd)

    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


def _cols(df, cols):
    return df[[c for c in cols if c in df.columns]]


def _fmt(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return str(v)


def _adaptive_sections(g: dict, rd: Path) -> list[str]:
    """"Adaptive attacks" and "Cost of hardening" (workbook 06)."""
    parts = ["<h2>Adaptive attacks</h2>"]
    table, pool, meta = g["adaptive"], g["adaptive_pooled"], g["adaptive_meta"] or {}
    if table is None or pool is None:
        parts.append("<p class='missing'>adaptive_attacks.csv / adaptive_pooled.csv not found (workbook 06).</p>")
    else:
        parts.append(
            "<p>An attacker who knows Algorithm 1 routes the unchanged One Pixel DE (untargeted) through a "
            "strategy: <b>interleave</b> (an unrelated decoy image before every candidate, so paper mode's single "
            "anchor is always the decoy), <b>fresh_session</b> (every candidate its own call with a new session id, "
            "16 in flight; <code>:c1</code> one at a time), <b>accounts</b> (4 sessions share the attack), "
            "<b>blinding</b> (a random shift/brightness/noise transform per query; <code>ensure</code> escalates it "
            "until the attacker's own hash check passes the thresholds). Every cell runs against a FRESH sidecar "
            "(<code>off</code> = undefended reference, <code>paper</code>, <code>hardened</code>), all with exact "
            "scores. <i>asr</i>: the attacker's verdict said success AND the model itself misclassifies the "
            "returned (un-blinded) image; <i>asr_claimed</i> is the verdict alone (cached answers can mislead "
            "it), <i>asr_model</i> the model alone; <i>forwarded_fraction</i>: images that reached the model, "
            "from the sidecar's counters.</p>")
        acc = meta.get("acceptance") or {}
        if acc:
            items = "".join(
                f"<li><b>{_esc(k)}</b>: paper {_fmt(v.get('paper'))}, hardened {_fmt(v.get('hardened'))} &rarr; "
                + ("hardened lower" if v.get("hardened_lower") else "<b>hardened NOT lower</b>") + "</li>"
                for k, v in acc.items())
            parts.append(f"<p>Pooled One Pixel ASR (over pixel counts), profile <b>{_esc(meta.get('profile'))}</b>:"
                         f"</p><ul>{items}</ul>")
        op = pool[pool.attack == "onepixel_untargeted"]
        parts.append("<h3>One Pixel Attack (untargeted), pooled over pixel counts</h3>")
        parts.append(_table_html(_cols(op, ["strategy", "mode", "asr", "n", "successes", "asr_claimed",
                                            "asr_model", "mean_queries", "forwarded_fraction", "profile"])))
        parts.append(_png_file(rd / "06_adaptive.png", "adaptive one pixel ASR"))
        parts.append("<h3>Per pixel count</h3>")
        t_op = table[table.attack == "onepixel_untargeted"]
        parts.append(_table_html(_cols(t_op, ["strategy", "model", "pixels", "mode", "asr", "n", "mean_queries",
                                              "asr_claimed", "asr_blinded", "forwarded_fraction",
                                              "cached_lookup_fraction", "blind_mean_l2", "blind_max_l2",
                                              "blind_mean_linf", "blind_mean_hash_distance",
                                              "blind_mean_sigma_used", "profile"]), "{:.3g}"))
        hsj = table[table.attack == "hopskipjump"]
        if len(hsj):
            hs = (meta.get("settings") or {}).get("hsj", {})
            parts.append("<h3>HopSkipJump (ART, decision-based)</h3>")
            parts.append(f"<p>Untargeted L2 HopSkipJump through an ART <code>BlackBoxClassifier</code> whose "
                         f"predict function calls the sidecar; budget {_esc(hs.get('budget'))} queries per image, "
                         f"max_iter {_esc(hs.get('max_iter'))}, max_eval {_esc(hs.get('max_eval'))}. "
                         "<i>median_l2_success</i>: L2 distance (on the [0, 1] scale) of the successful "
                         "adversarials.</p>")
            parts.append(_table_html(_cols(hsj, ["strategy", "model", "mode", "asr", "n", "asr_claimed",
                                                 "median_l2_success", "mean_queries", "forwarded_fraction",
                                                 "profile"]), "{:.3g}"))
            parts.append(_png_file(rd / "06_hsj.png", "HopSkipJump ASR"))
        if g["blinding_cost"] is not None:
            parts.append("<h3>What blinding costs</h3><p>The model's accuracy on blinded CLEAN copies of the "
                         "attacked images (before any attack) and their distances to the originals (L2 on [0, 1], "
                         "Linf in intensity levels, hash bits, differing pixels).</p>")
            parts.append(_table_html(g["blinding_cost"], "{:.3g}"))
        proj = meta.get("projection_full")
        if proj:
            parts.append("<p class='prov'>Full profile, projected from this run: "
                         + "; ".join(f"{_esc(k)}: {float(v.get('projected_hours_scaled', 0)):.1f} h "
                                     f"(upper bound {float(v.get('projected_hours_upper', 0)):.1f} h)"
                                     for k, v in proj.items() if isinstance(v, dict))
                         + f". {_esc(proj.get('note', ''))}</p>")
    parts.append("<h2>Cost of hardening</h2>")
    cost = g["hardening_cost"]
    if cost is None:
        parts.append("<p class='missing'>hardening_cost.csv not found (workbook 06).</p>")
    else:
        parts.append(
            "<p>Fresh paper and hardened sidecars. <b>clean</b>: the test images in order in one session; "
            "<b>many_users</b>: users (sessions) sending popular images, exactly or as near-duplicates (1-3 changed "
            "pixels, JPEG round trip), and their own images, interleaved in time; <b>poisoning</b>: an attacker "
            "session sends adversarial near-duplicates (the undefended One Pixel results), then victims in other "
            "sessions send the clean originals. <i>false_cache_rate</i>: answers whose label differs from the "
            "model's own label for the exact image sent (only cached answers can); <i>poison_success_rate</i>: "
            "victims answered with the attacker's adversarial label.</p>")
        parts.append(_table_html(cost, "{:.3g}"))
        parts.append(_png_file(rd / "06_hardening_cost.png", "hardening cost"))
    return parts


def _side_channel_sections(g: dict, rd: Path) -> list[str]:
    """"Side channels: distinguisher" and "OARS-style adaptive attack" (workbook 07)."""
    parts = ["<h2>Side channels: distinguisher</h2>"]
    dist = g["distinguisher"]
    if dist is None:
        parts.append("<p class='missing'>distinguisher.csv not found (workbook 07).</p>")
    else:
        parts.append(
            "<p>The attacker sends x, then a 1-pixel copy x'; hits come from a defended sidecar, misses from its "
            "<code>--mode off</code> twin with the same output policy and noise key (observations interleaved in "
            "time, fresh sidecar processes). <i>accuracy</i>: the better of the exact-replay rule and a logistic "
            "regression on content + timing features (5-fold CV); <i>content_accuracy</i> / "
            "<i>timing_accuracy</i>: one feature group alone. 0.5 = coin flip; with n observations per class, "
            "roughly 0.5 +- 1/sqrt(n) is chance.</p>")
        parts.append(_table_html(_cols(dist, ["policy", "padding", "hit_mode", "n_hits", "n_misses", "accuracy",
                                              "rule_accuracy", "logreg_accuracy", "content_accuracy",
                                              "timing_accuracy", "median_hit_latency_ms", "median_miss_latency_ms",
                                              "profile"]), "{:.3g}"))
        parts.append(_png_file(rd / "07_distinguisher.png", "distinguisher accuracy"))
    parts.append("<h2>OARS-style adaptive attack</h2>")
    oars_t, meta = g["oars"], g["oars_meta"] or {}
    if oars_t is None:
        parts.append("<p class='missing'>oars.csv not found (workbook 07).</p>")
    else:
        st = (meta.get("settings") or {}).get("oars", {})
        parts.append(
            "<p>After Feng et al. (CCS 2023): a score-based Linf Square Attack (eps "
            f"{_esc(st.get('eps'))} intensity levels, budget {_esc(st.get('budget'))} queries per image, one "
            "<code>Classify</code> per query in one session) and its adaptive version, which asks a detector after "
            "every answer whether it was cached and then resends the same candidate through a larger random "
            "transform (shift 1-2 px, then Gaussian noise 4-32) until the answer is judged fresh; answers about "
            "transformed copies only steer the search, success needs a fresh wrong label for the candidate "
            "itself. Detectors: <code>replay</code> (byte-identical answers; what a client can do) and "
            "<code>oracle</code> (the sidecar's counters; an upper bound no client has). <i>asr</i>: confirmed by "
            "the attacker AND the model misclassifies the returned in-ball image. The goal for hardened mode "
            "with the default output policy in the full profile is ASR &le; 5% within 10,000 queries.</p>")
        parts.append(_table_html(_cols(oars_t, ["mode", "policy", "attack", "asr", "n", "asr_claimed", "asr_model",
                                                "mean_queries", "median_queries_success", "forwarded_fraction",
                                                "detected_hit_fraction", "true_cached_fraction",
                                                "mean_ladder_level", "budget", "profile"]), "{:.3g}"))
        parts.append(_png_file(rd / "07_oars.png", "OARS ASR"))
        proj = meta.get("projection_full")
        if proj:
            parts.append(f"<p class='prov'>Full profile, projected from this run: "
                         f"{float(proj.get('projected_hours_upper', 0)):.1f} h upper bound. "
                         f"{_esc(proj.get('note', ''))}</p>")
    return parts
