"""The adaptive-attack table of hardened mode (issue 23's attacks at issue 29's size), as
markdown, from the committed files in ``results/adaptive/`` only.

* blinding and rotation: ``hardened_v3_stages_n100_blinding.json``;
* OARS-style tuning: ``hardened_v3_stages_n100_oars.json``;
* denial: ``hardened_v3_stages.json`` (20 images by the acceptance's own definition);
* end to end: every ``hardened_v3_e2e_*_rows.jsonl`` whose ``hardened`` rows are the final
  design (``E2E``), both arms, with Wilson intervals.

Written by ``python -m benchmarks.bench_hardened`` (commands in ``results/adaptive/README.md``);
``lab.results_docs`` puts this section into docs/research.md and the HTML report.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cells import wilson
from .paths import project_path

E2E = {  # rows file -> the attack, as a reader names it
    "hardened_v3_e2e_plain_rows.jsonl": "Square, no blinding (EOT 1)",
    "hardened_v3_e2e_field1_eot4_rows.jsonl": "Square + smooth field 1/255, EOT 4",
    "hardened_v3_e2e_field2_eot4_n100_rows.jsonl": "Square + smooth field 2/255, EOT 4",
    "hardened_v3_e2e_field8_eot4_final_rows.jsonl": "Square + smooth field 8/255, EOT 4",
}
OFF_ROWS = {"hardened_v3_e2e_field8_eot4_final_rows.jsonl": "hardened_v3_e2e_field8_eot4_rows.jsonl"}
IN_SCOPE = 0.9  # a strength is in scope when at least this share of blinded clean images keeps its label


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.0f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "–"


def _rows(path: Path) -> dict[tuple[int, str], dict]:
    rows: dict[tuple[int, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["image"], r["mode"])] = r
    return rows


def blinding_md(stage: dict) -> list[str]:
    b = stage["blinding"]
    out = [f"**Blinding** ({b['images']} images x {b['queries_per_image']} blinded 1-pixel queries, each in a fresh "
           "session of one host, after the clean image; a strength is in scope when >= 90% of blinded clean images "
           "keep their label on the augmented model): the share of queries answered by the model.", "",
           "| family | in scope: strength (label kept) → reached | out of scope: strength (label kept) → reached |",
           "|---|---|---|"]
    for fam, cells in b.items():
        if not isinstance(cells, dict):
            continue
        ins, outs = [], []
        for s, c in cells.items():
            if isinstance(c, dict) and "reached" in c:
                (ins if c["keeps_label"] >= IN_SCOPE else outs).append(
                    f"{s} ({100 * c['keeps_label']:.0f}%) → {_pct(c['reached'])}")
        out.append(f"| {fam} | {'; '.join(ins) or '–'} | {'; '.join(outs) or '–'} |")
    return out + [""]


def oars_md(stage: dict) -> list[str]:
    o = stage["oars"]
    out = ["**OARS-style tuning** (the attacker raises or lowers the blinding strength against its measured "
           "hit rate; capped: at the family's strongest in-scope strength): share of queries answered by the model "
           "[95% Wilson], the median final strength and the label kept there.", "",
           "| family | capped | uncapped |", "|---|---|---|"]
    for fam, v in o.items():
        if not isinstance(v, dict):
            continue
        cells = []
        for k in ("capped", "uncapped"):
            c = v.get(k)
            if isinstance(c, dict):
                lo, hi = c["wilson95"]
                cells.append(f"{_pct(c['reached'])} [{_pct(lo)}, {_pct(hi)}], strength {c['final_strength_median']:g}"
                             f" (label kept {100 * c['keeps_label_at_final']:.0f}%)")
            else:
                cells.append(str(c) if c else "–")
        out.append(f"| {fam} | {cells[0]} | {cells[1]} |")
    return out + [""]


def rotation_md(stage: dict) -> list[str]:
    r = stage["rotation"]
    out = ["**Session rotation and Sybil accounts** (1-pixel copies of seen images): share answered by the model.",
           "", "| model | copies | fresh session each, one host | spread over 10 accounts |", "|---|---|---|---|"]
    for m in ("quick", "augmented"):
        v = r[m]
        cells = [f"{_pct(v[k]['reached'])} [{_pct(v[k]['wilson95'][0])}, {_pct(v[k]['wilson95'][1])}]"
                 for k in ("one_host", "10_accounts")]
        out.append(f"| {m} | {v['copies']} | {cells[0]} | {cells[1]} |")
    return out + [""]


def e2e_md(d: Path) -> list[str]:
    out = ["**End to end** (ART `SquareAttack`, L-inf 8/255, <= 10,000 queries, on the first 100 test images the "
           "augmented model classifies correctly; success = the attacker's final image fools the model): "
           "successes [95% Wilson].", "", "| attack | through hardened mode | no defense | queries that reached "
           "the model through hardened mode, per image |", "|---|---|---|---|"]
    for name, label in E2E.items():
        rows, off = _rows(d / name), _rows(d / OFF_ROWS.get(name, name))
        h = [r for (i, m), r in rows.items() if m == "hardened"]
        o = [r for (i, m), r in off.items() if m == "off"]
        if not h:
            continue
        reached = max(r["reached"] for r in h)
        out.append(f"| {label} | {_rate(sum(r['success'] for r in h), len(h))} | "
                   f"{_rate(sum(r['success'] for r in o), len(o))} | at most {reached} |")
    return out + [""]


def denial_md(stage: dict) -> list[str]:
    out = ["**Denial** (an attacker spends 1,000 near-duplicates of 20 images in fresh sessions, from one host or 10 "
           "accounts; then 10 other principals per image send the exact image): victims refused or mislabelled.", ""]
    for m in ("quick", "augmented"):
        v = stage["denial"][m]
        parts = [f"{k.replace('_', ' ')}: {_rate(v[k]['refused_or_mislabelled'], v[k]['victim_requests'])}"
                 for k in v if isinstance(v[k], dict) and "victim_requests" in v[k]]
        out.append(f"* {m} model: {'; '.join(parts)}")
    return out + [""]


def markdown(root=None) -> list[str]:
    d = Path(root) if root else project_path("results/adaptive")
    n100, oars, base = (d / "hardened_v3_stages_n100_blinding.json", d / "hardened_v3_stages_n100_oars.json",
                        d / "hardened_v3_stages.json")
    lines = ["### Adaptive attacks on hardened mode", "",
             "Issue 23's attacks at issue 29's size, from `results/adaptive/` (hardened mode's own judgment, "
             "default settings, exact scores, in front of the quick `cnn` and the photometric-augmentation `cnn`; "
             "commands and models in `results/adaptive/README.md`).", ""]
    if n100.exists():
        stage = json.loads(n100.read_text())
        lines += blinding_md(stage) + rotation_md(stage)
    if oars.exists():
        lines += oars_md(json.loads(oars.read_text()))
    lines += e2e_md(d)
    if base.exists():
        stage = json.loads(base.read_text())
        if "denial" in stage:
            lines += denial_md(stage)
    return lines
