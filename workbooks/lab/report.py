"""Gather the workbooks' result files and render ``report.html`` (self-contained).

Every section is a CSV table (``<name>.csv``) with a JSON provenance file
(``<name>.json``: profile, settings, ``implementation`` = the attack code behind the
table, ART class and version or ours with its parity check) and optional PNGs, all
under the reports directory. The paper's Tables 1-3 (``lab.paper_tables``) are set
beside ours. Nothing here computes a figure; a missing input is shown as missing.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import paper_tables

PAPER = {"jsma": ("table1_jsma", "theta"), "onepixel_targeted": ("table2_onepixel_targeted", "pixels"),
         "onepixel_untargeted": ("table3_onepixel_untargeted", "pixels")}

# (file stem, title, what it shows, PNGs)
SECTIONS = [
    ("models", "Models (01)", "Test accuracy and size of the exported models beside the paper-size zoo.",
     ["01_models.png"]),
    ("table1_jsma", "Table 1: JSMA (02)", "Attack success rate without (--mode off) / with (--mode paper) the "
     "defense and with --mode hardened (ours only), paper beside ours; Wilson 95% intervals; n = attacked "
     "images; 'pending': that column's cell has not run.", ["02_jsma.png"]),
    ("table2_onepixel_targeted", "Table 2: One Pixel, targeted (03)", "As Table 1, per number of pixels.",
     ["03_onepixel_targeted.png"]),
    ("table3_onepixel_untargeted", "Table 3: One Pixel, untargeted (03)", "As Table 2, untargeted (ART's: "
     "lower the true label's score until another label wins).", ["03_onepixel_untargeted.png"]),
    ("benign_cost", "Benign cost (04)", "Clean accuracy with and without the defense, cached answers and "
     "wrong cached answers.", ["04_benign_cost.png"]),
    ("timing", "Timing side channel (05)", "Client-side latency of cached vs forwarded answers per padding "
     "mode: KS test and the best threshold classifier (0.5 = no leak).", ["timing_hist.png"]),
    ("adaptive", "Adaptive attacks (06)", "One Pixel (untargeted) through each query strategy, against fresh "
     "off / paper / hardened sidecars.", ["06_adaptive.png"]),
    ("decision", "Decision- and score-based attacks (06)", "HopSkipJump and SimBA, plain and with a fresh "
     "session per query.", []),
    ("hardening_cost", "Cost of hardening (06)", "False cached answers (a cached answer whose label differs "
     "from the model's own) for clean, many-user and poisoning streams; hardened mode once counted refusals "
     "apart (refused, refusal_rate), not as false answers.", ["06_hardening_cost.png"]),
    ("blinding", "Hash-aware and random-transform blinding (06)", "The attacks of lab.hashaware / "
     "lab.blinding against the judgment modes.", []),
    ("distinguisher", "Hit/miss distinguisher (07)", "Accuracy of telling a cached answer from a fresh one, "
     "per output policy and padding (0.5 = coin flip).", ["07_distinguisher.png"]),
    ("oars", "OARS-style resampling (07)", "ART's SquareAttack, plain and behind the resampling router.",
     ["07_oars.png"]),
]

CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h2{margin-top:2em;border-bottom:1px solid #ccc}table.data{border-collapse:collapse;font-size:.8em}
table.data th,table.data td{border:1px solid #ccc;padding:.2em .45em;text-align:right}
table.data th{background:#f2f2f2}.missing{color:#a00}.prov{font-size:.8em;color:#555}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}"""

SUCCESS = ("<b>success</b> (every table): the attack returned an image that the sidecar's answer in the "
           "attacker's own session said meets the goal (<i>claimed</i>) AND that the model itself, asked "
           "without the defense, classifies as the goal (<i>fooled</i>). Goal: the target label (targeted) or "
           "any label but the true one (untargeted). ASR = successes / attacked images, all of them "
           "correctly classified beforehand.")


def comparison(section: str, ours):
    """Our Table 1/2/3 merged with the paper's on (model, parameter); our ASR columns say
    ``pending`` where their cell has not run (never a number that was not measured)."""
    from .tables import DEFENSES, SUFFIX

    param = PAPER[section][1]
    paper = paper_tables.frame(section).rename(columns={"asr_without_defense": "paper_asr_without_defense",
                                                        "asr_with_defense": "paper_asr_with_defense"})
    merged = ours.merge(paper, on=["model", param], how="left")
    merged["paper_model_accuracy"] = merged["model"].map(paper_tables.PAPER_MODEL_ACCURACY)
    asr = [f"asr_{SUFFIX[d]}" for d in DEFENSES]
    for c in asr:
        merged[c] = [pending(v) for v in merged[c]] if c in merged else "pending"
    first = ["model", param, "paper_asr_without_defense", "paper_asr_with_defense", *asr]
    return merged[[c for c in first if c in merged] + [c for c in merged.columns if c not in first]]


def pending(v) -> str:
    """An ASR as shown: three decimals, or ``pending`` for a cell with no row yet."""
    return "pending" if v is None or v != v else f"{float(v):.3f}"


def bar_plot(table, param: str, title: str, section: str | None = None, value: str = "asr"):
    """Grouped bars without / with defense (ours), the paper's hatched when ``section`` is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [f"{m}\n{param}={p}" for m, p in zip(table["model"], table[param])]
    series = [("ours, no defense", table[f"{value}_without_defense"], "#4477aa", None),
              ("ours, defense", table[f"{value}_with_defense"], "#cc3311", None)]
    if f"{value}_hardened" in table:  # an empty bar where the hardened cell is pending
        series.append(("ours, hardened", table[f"{value}_hardened"], "#228833", None))
    if section is not None:
        merged = table[["model", param]].merge(paper_tables.frame(section), on=["model", param], how="left")
        series += [("paper, no defense", merged["asr_without_defense"], "#4477aa", "//"),
                   ("paper, defense", merged["asr_with_defense"], "#cc3311", "//")]
    xs, width = np.arange(len(labels)), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels) + 2), 3.8))
    for j, (name, vals, color, hatch) in enumerate(series):
        ax.bar(xs + (j - (len(series) - 1) / 2) * width, np.asarray(vals, float), width, label=name, color=color,
               alpha=0.4 if hatch else 0.9, hatch=hatch, edgecolor="black", linewidth=0.3)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attack success rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def grouped_bars(df, group: str, hue: str, value: str, title: str):
    """Bars of ``value`` per ``group`` (x) and ``hue`` (colour)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    piv = df.pivot_table(index=group, columns=hue, values=value, aggfunc="mean", sort=False)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(piv) + 2), 3.6))
    piv.plot.bar(ax=ax, rot=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(value)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write(report_dir: str | Path, name: str, table, meta: dict) -> None:
    """``<name>.csv`` and ``<name>.json`` (meta plus the time)."""
    rd = Path(report_dir)
    rd.mkdir(parents=True, exist_ok=True)
    table.to_csv(rd / f"{name}.csv", index=False)
    meta = {**meta, "created_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    (rd / f"{name}.json").write_text(json.dumps(meta, indent=2, default=str))


def gather(report_dir: str | Path) -> dict:
    import pandas as pd

    rd, out = Path(report_dir), {}
    for stem, *_ in SECTIONS:
        csv, js = rd / f"{stem}.csv", rd / f"{stem}.json"
        table = pd.read_csv(csv) if csv.exists() else None
        meta = json.loads(js.read_text()) if js.exists() else {}
        meta = meta if isinstance(meta, dict) else {}  # models.json is the model list itself
        for sec, (paper_stem, _) in PAPER.items():
            if stem == paper_stem and table is not None and len(table):
                table = comparison(sec, table)
        out[stem] = {"table": table, "meta": meta}
    return out


def _esc(s) -> str:
    return html.escape(str(s))


def _png(path: Path) -> str:
    if not path.exists():
        return ""
    return f"<img alt='{_esc(path.name)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def kept_results(profiles=("cpu",)) -> list[str]:
    """The committed results (``results/<profile>/``, ``lab.results_docs``) as HTML sections."""
    import mistune

    from .paths import project_path
    from .results_docs import markdown

    to_html = mistune.create_markdown(plugins=["table"])
    return [f"<h2>Kept results: {_esc(p)} profile (results/{_esc(p)}/)</h2>" + to_html(markdown(p))
            for p in profiles if (project_path(f"results/{p}") / "provenance.json").exists()]


def render(report_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: in ``report_dir``) and return its path."""
    rd = Path(report_dir)
    out = Path(out) if out else rd / "report.html"
    g = gather(rd)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hashguard research report</title>"
             f"<style>{CSS}</style></head><body><h1>hashguard: perceptual-hash defense, reproduced</h1>",
             f"<p class='prov'>Generated {datetime.now(timezone.utc).replace(microsecond=0).isoformat()}.</p>",
             f"<div class='note'>{SUCCESS} The <code>quick</code> profile uses small models and a handful of "
             "images: it shows that the pipeline works, not what the paper measured.</div>"]
    for stem, title, what, pngs in SECTIONS:
        d = g[stem]
        parts.append(f"<h2>{_esc(title)}</h2><p>{_esc(what)}</p>")
        if d["table"] is None:
            parts.append(f"<p class='missing'>{stem}.csv not found (workbook not run).</p>")
            continue
        m = d["meta"]
        prov = ", ".join(f"{k}: {_esc(m[k])}" for k in ("profile", "implementation", "parity") if k in m)
        if prov:
            parts.append(f"<p class='prov'>{prov}</p>")
        parts.append(d["table"].to_html(index=False, classes="data", border=0, na_rep="–", float_format="{:.3f}".format))
        parts += [_png(rd / p) for p in pngs]
    parts += kept_results()
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
