"""The research tables of docs/research.md, generated from the kept results (``results/<profile>/``).

    python -m lab.results_docs [--profile cpu] [--write]

Prints (or, with ``--write``, puts between docs/research.md's ``<!-- results:<profile> -->``
markers) the models beside the paper's zoo, Tables 1-3 beside the paper's with Wilson
95% intervals, the DE check, the explanation of the defended column and the run's state.
Every figure comes from the committed files; ``markdown(profile)`` is also what the
HTML report shows (``lab.report``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .paths import project_path

HEADS = {"off": "no defense", "paper": "defense (paper mode)", "hardened": "hardened"}
TITLES = {"table1": "Table 1: JSMA", "table2": "Table 2: One Pixel, targeted",
          "table3": "Table 3: One Pixel, untargeted"}


def title(name: str, prov: dict) -> str:
    """The table's name and the attack implementation its committed rows name."""
    impl = prov.get("implementation", {}).get(name, {})
    attacks = ", ".join(f"ART `{a}`" for a in impl.get("attacks", []))
    return f"{TITLES[name]} ({attacks}; {impl['library']})" if attacks else TITLES[name]


def _f(v, nd=2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _cell(r) -> str:
    return f"{_f(r['rate'])} [{_f(r['wilson_lo'])}, {_f(r['wilson_hi'])}] (n={int(r['n'])})"


def _eta(eta: dict) -> str:
    known = {k: v for k, v in eta.items() if k != "note" and v}
    unknown = [k for k, v in eta.items() if k != "note" and v is None]
    if not known:
        return ""
    return (f"; about {sum(known.values()) / 60:.0f} min of attack time left in the tables with a finished cell"
            + (f" (not counting {', '.join(unknown)})" if unknown else ""))


def load(profile: str = "cpu", root=None) -> dict:
    import pandas as pd

    d = Path(root) if root else project_path(f"results/{profile}")
    out = {n: pd.read_csv(d / f"{n}.csv") for n in ("table1", "table2", "table3", "models", "de_check")
           if (d / f"{n}.csv").exists()}
    out["provenance"] = json.loads((d / "provenance.json").read_text())
    return out


def table_md(df, name: str, prov: dict) -> list[str]:
    """Ours per defense (``lab.tables.DEFENSES``) beside the paper's two columns; a cell with no
    row yet says ``pending``."""
    if df is None or not len(df):
        return [f"**{title(name, prov)}**: no cell finished yet.", ""]
    from .results import paper_rates
    from .tables import DEFENSES

    param, paper = df.param.iloc[0], paper_rates(df.experiment.iloc[0])
    ours = [f"ours, {HEADS.get(d, d)}" for d in DEFENSES]
    lines = [f"**{title(name, prov)}**: ASR [95% Wilson interval] (n images); the paper's beside it "
             "(the paper has no hardened mode)", "",
             f"| model | {param} | paper, no defense | paper, defense | {' | '.join(ours)} |",
             "|---|---|---|---|" + "---|" * len(ours)]
    for (m, v), g in df.groupby(["model", "value"], sort=False):
        by = {r["defense"]: r for r in g.to_dict("records")}
        lines.append(f"| {m} | {v:g} | {_f(paper.get((m, v, 'off')), 3)} | {_f(paper.get((m, v, 'paper')), 3)} | "
                     + " | ".join(_cell(by[d]) if d in by else "pending" for d in DEFENSES) + " |")
    return lines + [""]


def columns_md(prov: dict) -> list[str]:
    """Who ran each added column (``provenance.json``'s ``columns_added``, ``lab.results_columns``)."""
    lines = []
    for d, c in prov.get("columns_added", {}).items():
        ran = sorted({x["commit"][:10] for x in c.get("sittings", [])})
        done, pending = len(c["cells_done"]), len(c["cells_pending"])
        acc = ", ".join(f"{k} {_f(v, 3)}" for k, v in c.get("model_accuracy", {}).items())
        lines.append(f"The `{d}` column: {c['sidecar']}; cells run by commit {', '.join(f'`{x}`' for x in ran) or '–'}, "
                     f"merged {c['created_utc']} (commit `{c['commit'][:10]}`): {done} of {done + pending} cells done"
                     + (f", {pending} pending" if pending else "") + f". Models from `{c['models_dir']}`"
                     + (f" (test accuracy {acc})" if acc else "") + "; images by the same rule and seeds as the "
                     "other columns.")
    return lines + [""] if lines else []


def remeasured_md(prov: dict) -> list[str]:
    """The models measured again in every column (``provenance.json``'s ``models_remeasured``)."""
    log = prov.get("models_remeasured", {})
    if not log:
        return []
    ran = sorted({x["commit"][:10] for m in log.values() for x in m.get("sittings", [])})
    accs = ", ".join(f"{m} {_f(c['test_accuracy_before'], 4)} -> {_f(c['test_accuracy'], 4)}" for m, c in log.items())
    cells = sum(len(c["cells_merged"]) for c in log.values())
    first = next(iter(log.values()))
    return [f"Measured again: {', '.join(f'`{m}`' for m in log)}. Their first exports were lost with a machine and "
            "`python -m lab.train --replay` did not rebuild them to the recorded test accuracy (before -> the "
            f"rebuilt export: {accs}), so every column of their cells ({cells} cells) and their DE check ran again "
            f"on the rebuilt exports, by commit {', '.join(f'`{x}`' for x in ran) or '–'}, merged "
            f"{first['created_utc']}; their rows and the models table describe the rebuilt models.", ""]


def models_md(df) -> list[str]:
    if df is None or not len(df):
        return ["Models: none exported yet.", ""]
    lines = ["| model | ours: test acc. | params | width, depth | epochs (s) | paper zoo: acc. | params |",
             "|---|---|---|---|---|---|---|"]
    for r in df.to_dict("records"):
        depth = "" if r["depth"] is None or (isinstance(r["depth"], float) and math.isnan(r["depth"])) else \
            f", {int(r['depth'])}"
        ref_p = r["reference_params"]
        lines.append(f"| {r['name']} | {_f(r['test_accuracy'], 3)} | {int(r['params']):,} | {r['width']:g}{depth} | "
                     f"{int(r['epochs'])} ({_f(r['train_seconds'], 0)}) | {_f(r['reference_accuracy'], 3)} | "
                     f"{'–' if ref_p != ref_p or ref_p is None else f'{int(ref_p):,}'} |")
    return lines + [""]


def explanation(t: dict) -> list[str]:
    import pandas as pd

    from .results import paper_rates

    parts = [t[n] for n in ("table1", "table2", "table3") if n in t and len(t[n])]
    if not parts:
        return []
    df = pd.concat(parts)
    lines = ["**Where the defended column's successes come from.** Paper mode keeps one anchor per session, "
             "the last image it forwarded; a query within the thresholds of it gets the anchor's answer. "
             "An image's first query (the attacker's first candidate) differs from the previous image's "
             "anchor, so it is forwarded and becomes the new anchor; a success either rests on that answer "
             "(`from_first_forward`: the first candidate "
             "was already adversarial, and the final image, also answered from it, really is) or on a later "
             "query the sidecar forwarded because it was far enough from the anchor. Per table:", "",
             "| table | defended cells | images | first query forwarded | successes | from the first query "
             "| from a later forwarded one | only at the final check | first query met the goal (defended / "
             "undefended images) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, g in df.groupby("table", sort=True):
        p, o = g[g.defense == "paper"], g[g.defense == "off"]
        if not len(p):
            continue
        lines.append(f"| {name} | {len(p)} | {int(p.n.sum())} | {int(p.first_forwarded.sum())} | "
                     f"{int(p.successes.sum())} | "
                     f"{int(p.from_first_forward.sum())} | {int(p.from_later_forward.sum())} | "
                     f"{int(p.from_final_check.sum())} | {int(p.first_meets_goal.sum())} / "
                     f"{int(o.first_meets_goal.sum())} |")
    p = df[df.defense == "paper"]
    if len(p):
        fw = (p.forwarded_fraction * p.mean_queries).groupby(p.table).mean()
        lines += ["", f"Our defended rates range {_f(p.rate.min())}-{_f(p.rate.max())} over {len(p)} cells; the "
                  f"paper's for the same cells {_f(p.paper_rate.min())}-{_f(p.paper_rate.max())}. Queries "
                  "forwarded per attacked image in the defended column: "
                  + ", ".join(f"{k} {_f(v, 1)}" for k, v in fw.items()) + "."]
        for k, v in fw.items():
            g = p[p.table == k]
            pr = [v_ for (_, _, d), v_ in paper_rates(g.experiment.iloc[0]).items() if d == "paper"]
            if v <= 1.05:  # the attack saw the model once per image: its first candidate
                lines.append(f"In {k} the DE got one model answer per image, its first candidate's; every later "
                             "candidate was answered from that anchor, so the search was blind. A defended success "
                             f"then needs an adversarial first candidate: {int(g.first_meets_goal.sum())} of "
                             f"{int(g.n.sum())} images had one. The paper's defended rates in this table "
                             f"({_f(min(pr))}-{_f(max(pr))}) would need more than that from an Algorithm-1 "
                             "defense.")
            else:  # the attack got real answers again later: it was not blinded, only delayed
                lines += _not_blinded(k, v, g, df[(df.defense == "off") & (df.table == k)], pr)
        lines.append("")
    return lines


def _per_image(cells, per_cell) -> float:
    """A per-image figure over ``cells`` (table rows) from its per-cell means, each weighted by its n."""
    return float((per_cell * cells.n).sum() / max(cells.n.sum(), 1))


def hardened_md(t: dict) -> list[str]:
    """The hardened column beside paper mode's, per table: images, successes, where they came
    from, and how often the attack reached the model."""
    import pandas as pd

    parts = [t[n] for n in ("table1", "table2", "table3") if n in t and len(t[n])]
    if not parts:
        return []
    df = pd.concat(parts)
    h = df[df.defense == "hardened"]
    if not len(h):
        return []
    lines = ["**The hardened column beside paper mode.** The same images, targets and seeds, each cell through "
             "a fresh `--mode hardened` sidecar. Per table:", "",
             "| table | hardened cells | images | successes: hardened (paper mode) | hardened rates | from the "
             "first query | from a later forwarded one | queries forwarded per image: hardened (paper mode) | "
             "mean queries per image: hardened (paper mode) |", "|---|---|---|---|---|---|---|---|---|"]
    fw = lambda x: _per_image(x, x.forwarded_fraction * x.mean_queries)  # noqa: E731
    q = lambda x: _per_image(x, x.mean_queries)  # noqa: E731
    for name, g in h.groupby("table", sort=True):
        p = df[(df.table == name) & (df.defense == "paper")]
        lines.append(f"| {name} | {len(g)} | {int(g.n.sum())} | {int(g.successes.sum())} "
                     f"({int(p.successes.sum())}) | {_f(g.rate.min())}-{_f(g.rate.max())} | "
                     f"{int(g.from_first_forward.sum())} | {int(g.from_later_forward.sum())} | "
                     f"{_f(fw(g), 2)} ({_f(fw(p), 2)}) | {_f(q(g), 0)} ({_f(q(p), 0)}) |")
    return lines + [""]


def _not_blinded(k: str, forwarded: float, p, o, paper_rates) -> list[str]:
    """A table whose attack reached the model more than once per image (JSMA: its gradients
    come from the attacker's own copy, so cached answers do not steer it)."""
    later = int(p.from_later_forward.sum())
    trend = "; ".join(f"{m} {_f(g.sort_values('value').rate.iloc[0])} at {g.param.iloc[0]} "
                      f"{g.value.min():g} to {_f(g.sort_values('value').rate.iloc[-1])} at {g.value.max():g}"
                      for m, g in p.groupby("model", sort=False))
    q_off, q_pap = _per_image(o, o.mean_queries), _per_image(p, p.mean_queries)
    return [f"In {k} the attack reached the model {_f(forwarded, 1)} times per image on average. Its gradients "
            "come from the attacker's local copy of the model (the paper's white-box setting), so answers from "
            "the anchor do not steer its search; they only hide the step at which it has succeeded. It keeps "
            "changing pixels until its image is farther from the anchor than both thresholds; that query is "
            f"forwarded, and the model's answer ends the attack: {later} of {int(p.successes.sum())} defended "
            f"successes came from such a later forwarded query. The defense costs it queries (mean "
            f"{_f(q_pap, 1)} per image defended against {_f(q_off, 1)} undefended), and the defended rate "
            f"rises with {p.param.iloc[0]}: {trend}. The paper's defended rates "
            f"here ({_f(min(paper_rates))}-{_f(max(paper_rates))}) are lower; its JSMA was AdvBox's, whose "
            "budget \"Table 1 with AdvBox's JSMA\" above runs (when `table1_advbox.csv` is committed)."]


def reduction(pairs) -> tuple[float, float, float] | None:
    """The mean over cells of the relative ASR reduction 1 - defended/undefended (the paper's
    "reduced by an average of 36.3%" is this over its Table 1) and the range its cells' Wilson 95%
    intervals allow: per cell from 1 - hi(defended)/lo(undefended) to 1 - lo(defended)/hi(undefended),
    averaged over the cells (conservative: wider than an interval for the mean). ``pairs``:
    (k_off, n_off, k_def, n_def) per cell; None when a cell has no undefended success."""
    from .cells import wilson

    if not pairs or any(k_o == 0 for k_o, _, _, _ in pairs):
        return None
    r, lo, hi = [], [], []
    for k_o, n_o, k_d, n_d in pairs:
        (o_lo, o_hi), (d_lo, d_hi) = wilson(k_o, n_o), wilson(k_d, n_d)
        r.append(1 - (k_d / n_d) / (k_o / n_o))
        lo.append(1 - d_hi / o_lo)
        hi.append(1 - d_lo / o_hi)
    m = len(r)
    return sum(r) / m, sum(lo) / m, sum(hi) / m


def paper_reduction() -> float:
    from .paper_tables import rows

    return sum(1 - r["asr_with_defense"] / r["asr_without_defense"] for r in rows("jsma")) / len(rows("jsma"))


def advbox_md(profile: str = "cpu", root=None) -> list[str]:
    """Table 1 with AdvBox's JSMA (``lab.advbox_jsma``) beside the paper's and ART's Table 1."""
    import pandas as pd

    d = Path(root) if root else project_path(f"results/{profile}")
    if not (d / "table1_advbox.csv").exists():
        return []
    t = pd.read_csv(d / "table1_advbox.csv")
    prov = json.loads((d / "table1_advbox_provenance.json").read_text())
    art = pd.read_csv(d / "table1.csv") if (d / "table1.csv").exists() else None
    s = prov["settings"]
    done, pending = len(prov["cells_done"]), len(prov["cells_pending"])
    lines = [f"**Table 1 with AdvBox's JSMA** (`{prov['implementation']}`; max_iter {s['max_iter']}, at most "
             f"{s['max_perturbations_per_pixel']} changes per feature, one random target per image, success = "
             f"an answer says the target and the model confirms; gradient of the target's {s['gradient']}; "
             f"{prov['sessions']}): ASR [95% Wilson interval] (n images), the paper's and ART's Table 1 "
             f"(`table1.csv`, gamma 0.1) beside it. Written {prov['created_utc']} (commit "
             f"`{prov['commit'][:10]}`): {done} of {done + pending} cells done"
             + ("." if not pending else f"; pending: {', '.join(c.split('/', 1)[1] for c in prov['cells_pending'])}."),
             advbox_models(prov, d),
             "", "| model | theta | AdvBox, no defense | paper | AdvBox, defense (paper mode) | paper | "
             "ART, no defense | ART, defense | mean queries (no defense / defense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for (m, v), g in t.groupby(["model", "theta"], sort=False):
        by = {r["defense"]: r for r in g.to_dict("records")}
        off, pap = by.get("off"), by.get("paper")
        a = {} if art is None else {r["defense"]: r for r in art[(art.model == m) & (art.value == v)]
                                    .to_dict("records")}
        from .paper_tables import rows

        p = {(r["model"], r["theta"]): r for r in rows("jsma")}.get((m, v), {})
        lines.append(f"| {m} | {v:g} | {_cell(off) if off else 'pending'} | {_f(p.get('asr_without_defense'), 3)} | "
                     f"{_cell(pap) if pap else 'pending'} | {_f(p.get('asr_with_defense'), 3)} | "
                     f"{_f(a['off']['rate']) if 'off' in a else '–'} | {_f(a['paper']['rate']) if 'paper' in a else '–'}"
                     f" | {_f(off['mean_queries'], 0) if off else '–'} / {_f(pap['mean_queries'], 0) if pap else '–'} |")
        if off and pap:
            pairs.append((int(off["successes"]), int(off["n"]), int(pap["successes"]), int(pap["n"])))
    lines.append("")
    lines += reduction_sentence(pairs, t)
    return lines + [""] + advbox_tagged_md(d, "hardened") + advbox_tagged_md(d, "score")


def advbox_models(prov: dict, d: Path) -> str:
    """Which models the AdvBox table attacked: those of ``models.csv`` (their Keras copies rebuilt
    from the exports) or others, said with their test accuracy."""
    import pandas as pd

    acc = prov.get("model_accuracy", {})
    kept = ({r["name"]: r["test_accuracy"] for r in pd.read_csv(d / "models.csv").to_dict("records")}
            if (d / "models.csv").exists() else {})
    listed = ", ".join(f"{k} {_f(v, 3)}" for k, v in acc.items())
    if acc and all(kept.get(k) == v for k, v in acc.items()):
        return (f"Models: the exported models behind `table1.csv` (`models.csv`; test accuracy {listed}), the "
                "attacker's Keras copy of each rebuilt from its export (`lab.export.keras_from_export`, the same "
                "weights, checked answer for answer). Images: `table1.csv`'s.")
    return (f"Models: retrained with the cpu profile's recipe for this run (test accuracy {listed}); not the "
            "exported models behind `table1.csv` (`models.csv`). Images: those of `table1.csv`'s selection rule, "
            "asked of these models.")


def advbox_tagged_md(d: Path, tag: str) -> list[str]:
    """A run beside the AdvBox table at its own n (``python -m lab.advbox_jsma --tag <tag>``)."""
    import pandas as pd

    path = d / f"table1_advbox_{tag}.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    prov = json.loads((d / f"table1_advbox_{tag}_provenance.json").read_text())
    s = prov["settings"]
    what = ("The same attack with the gradient of the target's softmax score instead of its logit"
            if tag == "score" else f"The same attack against `--mode {tag}`")
    lines = [f"{what} (`table1_advbox_{tag}.csv`): n = {s['n_images']} images, "
             f"the first {s['n_images']} of the same selection with the same targets; "
             f"{len(prov['cells_done'])} of {len(prov['cells_done']) + len(prov['cells_pending'])} planned cells done.",
             "", "| model | theta | defense | ASR [95% CI] (n) | final image fools the model, told or not | "
             "mean queries | stopped at max_iter |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['theta']:g} | {r['defense']} | {_cell(r)} | {_f(r['fooled_rate'])} | "
              f"{_f(r['mean_queries'], 0)} | {int(r['stopped_max_iter'])} |" for r in t.to_dict("records")]
    return lines + [""]


def reduction_sentence(pairs, t) -> list[str]:
    pr = paper_reduction()
    red = reduction(pairs)
    if red is None:
        return [f"The paper's mean reduction over its 12 cells is {100 * pr:.1f}%; no cell here has both columns "
                "with an undefended success yet, so the comparison is not made."]
    m, lo, hi = red
    off_rate = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    def_rate = sum(p[2] for p in pairs) / sum(p[3] for p in pairs)
    verdict = "is reproduced" if lo <= pr <= hi else "is NOT reproduced"
    inside = {d: sum(1 for r in t[t.defense == d].to_dict("records")
                     if r["paper_rate"] == r["paper_rate"] and r["wilson_lo"] <= r["paper_rate"] <= r["wilson_hi"])
              for d in ("off", "paper")}
    counts = {d: int((t.defense == d).sum()) for d in ("off", "paper")}
    return [f"Over the {len(pairs)} cells with both columns, AdvBox's JSMA succeeds on {100 * off_rate:.1f}% of "
            f"the undefended images and on {100 * def_rate:.1f}% of the defended ones; the defense lowers its success rate by {100 * m:.1f}% on average "
            f"(from {100 * lo:.1f}% to {100 * hi:.1f}% within the cells' Wilson intervals, `lab.results_docs.reduction`); the paper's mean "
            f"reduction over its 12 cells is {100 * pr:.1f}%, so the paper's reduction {verdict} here"
            + ("" if len(pairs) == 12 else f" (on {len(pairs)} of the 12 cells)") + ". The paper's own rate lies "
            f"inside our Wilson interval in {inside['off']} of {counts['off']} undefended and {inside['paper']} of "
            f"{counts['paper']} defended cells."]


def markdown(profile: str = "cpu", root=None) -> str:
    t = load(profile, root)
    prov = t["provenance"]
    s = {k: prov["settings"].get(k, {}) for k in ("jsma", "onepixel_targeted", "de_check/onepixel_targeted")}
    done, pending = len(prov["cells_done"]), len(prov["cells_pending"])
    ran = sorted({x["commit"][:10] for x in prov.get("sittings", [])})
    lines = [f"Profile `{profile}`, cells run by commit {', '.join(f'`{c}`' for c in ran) or '–'}, tables "
             f"written {prov['created_utc']} (commit `{prov['commit'][:10]}`): "
             f"{done} of {done + pending} cells done" + ("." if not pending else
                                                         f"; {pending} pending (listed in `provenance.json`)"
                                                         + _eta(prov.get("eta_seconds", {})) + "."),
             f"Data: {prov['data']['train']} training / {prov['data']['test']} test images ({prov['data']['source']}). "
             f"JSMA gamma {s['jsma'].get('gamma')}; DE population {s['onepixel_targeted'].get('population')} x "
             f"{s['onepixel_targeted'].get('max_iter')} generations (the paper: 400 x 75), stopping at success; "
             "Table 3 is ART's untargeted attack, one run per image (the paper: each of the 9 wrong labels). "
             "Images: correctly classified test images, the same images, targets and seeds in every column.", ""]
    lines += columns_md(prov) + remeasured_md(prov)
    lines += models_md(t.get("models"))
    for name in ("table1", "table2", "table3"):
        lines += table_md(t.get(name), name, prov)
        if name == "table1":
            lines += advbox_md(profile, root)
    dc = t.get("de_check")
    if dc is not None and len(dc):
        lines += ["**The DE cut, measured** (undefended, the same images):", "",
                  "| table | model | pixels | DE | ASR [95% CI] (n) |", "|---|---|---|---|---|"]
        lines += [f"| {r['table']} | {r['model']} | {r['value']:g} | {r['de']} | {_cell(r)} |"
                  for r in dc.sort_values(["table", "model", "de"]).to_dict("records")] + [""]
    lines += explanation(t) + hardened_md(t)
    from .adaptive_docs import markdown as adaptive_markdown

    lines += [""] + adaptive_markdown()
    return "\n".join(lines)


def write_docs(profile: str, page=None) -> Path:
    path = Path(page) if page else project_path("docs/research.md")
    start, end = f"<!-- results:{profile} -->", f"<!-- /results:{profile} -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + markdown(profile) + "\n" + end + rest.split(end, 1)[1])
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.results_docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--write", action="store_true", help="replace the section in docs/research.md")
    a = ap.parse_args(argv)
    print(write_docs(a.profile) if a.write else markdown(a.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
