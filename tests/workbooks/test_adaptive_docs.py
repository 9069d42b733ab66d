"""The adaptive-attack section of the research docs: rendered from results/adaptive only."""

from __future__ import annotations

import json

from lab import adaptive_docs


def test_strengths_split_by_label_kept_and_e2e_arms_counted(tmp_path):
    stage = {"blinding": {"images": 2, "queries_per_image": 3,
                          "field": {"8": {"keeps_label": 0.95, "reached": 0.0},
                                    "48": {"keeps_label": 0.85, "reached": 0.25}}},
             "rotation": {m: {"copies": 30, "one_host": {"reached": 0.0, "wilson95": [0.0, 0.1]},
                              "10_accounts": {"reached": 0.1, "wilson95": [0.05, 0.2]}} for m in ("quick", "augmented")}}
    (tmp_path / "hardened_v3_stages_n100_blinding.json").write_text(json.dumps(stage))
    rows = [{"image": i, "mode": m, "success": m == "off" and i < 3, "reached": 1 if m == "hardened" else 99}
            for i in range(4) for m in ("hardened", "off")]
    (tmp_path / "hardened_v3_e2e_plain_rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = "\n".join(adaptive_docs.markdown(tmp_path))
    assert "| field | 8 (95%) → 0.00% | 48 (85%) → 25.00% |" in text
    assert "| Square, no blinding (EOT 1) | 0/4 = 0%" in text and "| 3/4 = 75%" in text
    assert "OARS" not in text  # no file, no section: nothing is made up


def test_the_committed_results_render_every_end_to_end_attack_at_n100():
    text = "\n".join(adaptive_docs.markdown())
    for label in adaptive_docs.E2E.values():
        line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
        assert line.count("/100 = ") == 2, line
