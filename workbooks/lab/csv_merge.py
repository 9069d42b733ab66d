"""Add rows to a committed CSV without rewriting the rows already in it.

``merge(path, new_text, key, group)``: ``new_text`` is a CSV with the same header (as
``DataFrame.to_csv`` writes it). A new row whose ``key`` columns match a line of the file
replaces that line in place; any other new row goes after the last line of its ``group``
(e.g. the other defenses of the same model and setting), or at the end. Every other line
stays byte for byte, so adding a column to a kept table never changes the rows measured
before it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence


def _fields(header: str, line: str) -> dict[str, str]:
    return dict(zip(next(csv.reader([header])), next(csv.reader([line]))))


def merge(path: str | Path, new_text: str, key: Sequence[str], group: Sequence[str]) -> dict[str, int]:
    """Merge ``new_text``'s rows into ``path`` (created if missing); returns the counts of
    lines ``replaced``, ``added`` and ``kept`` unchanged."""
    path = Path(path)
    new = new_text.splitlines(keepends=True)
    if not new:
        raise ValueError("new_text has no header")
    header, rows = new[0], new[1:]
    lines = path.read_text().splitlines(keepends=True) if path.exists() else [header]
    if lines[0] != header:
        raise ValueError(f"{path.name}: its header differs from the rows to merge:\n{lines[0]}{header}")
    if lines[-1] and not lines[-1].endswith("\n"):
        lines[-1] += "\n"

    def cols(line: str, names: Sequence[str]) -> tuple[str, ...]:
        f = _fields(header, line)
        return tuple(f[n] for n in names)

    replaced = added = 0
    for row in rows:
        if not row.endswith("\n"):
            row += "\n"
        k, g = cols(row, key), cols(row, group)
        same = [i for i in range(1, len(lines)) if cols(lines[i], key) == k]
        if same:
            lines[same[0]] = row
            replaced += 1
            continue
        near = [i for i in range(1, len(lines)) if cols(lines[i], group) == g]
        lines.insert(near[-1] + 1 if near else len(lines), row)
        added += 1
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)
    return {"replaced": replaced, "added": added, "kept": len(lines) - 1 - replaced - added}
