"""Gather the workbooks' results and render ``report.html``.

Inputs, all under the reports directory (written by the workbooks):
``models.csv`` (training), ``table1_jsma.csv``, ``table2_onepixel_targeted.csv``,
``table3_onepixel_untargeted.csv`` with their ``<section>.json`` provenance,
``benign_cost.csv``/``.json`` and ``timing.json``/``timing_latencies.csv``.
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

    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out
