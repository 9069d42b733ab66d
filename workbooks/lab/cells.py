"""One result row, one experiment loop: (model, setting, defense) cells, resumable.

``Row`` is the only result type; its fields mean the same in every workbook:

* ``defense``: the sidecar's judgment mode the attacker talked to (``off``, ``paper``,
  ``hardened``); ``setting``: the cell's parameter as text (``theta=0.1``, ``pixels=3``,
  ``interleave/pixels=1``); ``attack``: the implementation (ART class, or ours);
* ``goal``: ``target`` (reach ``target``) or ``untargeted`` (any label but ``true_label``);
* ``answered_label``: what the sidecar answered the attacker for the returned image in
  the attack's own session; ``model_label``: what the model itself answers for it
  (a ``--mode off`` sidecar, fresh session): the ground truth;
* ``claimed``: ``answered_label`` meets the goal (the attacker believes it won);
  ``fooled``: ``model_label`` meets the goal;
* **success = claimed and fooled**: the attack returned an image that it was told meets
  its goal and that really does. Without a defense the two agree; with one, a cached
  answer can make the attacker claim a success the model does not confirm (or miss one);
* ``queries``: images the attack sent; ``forwarded``/``cached``: how many of them
  reached the model / were answered from a cache (the sidecar's counters); ``refused``:
  how many the sidecar refused (hardened mode's near-duplicate budget; label -1);
* ``l0``: pixel positions changed, ``l2``: L2 distance on the 0-1 scale.

``run_cells(cells, fn, results_dir)``: each cell's rows are one JSON file
``<results_dir>/<cell.key>.json``; a finished cell is skipped on a rerun, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np


@dataclass
class Row:
    experiment: str
    attack: str
    model: str
    setting: str
    defense: str
    image_index: int
    true_label: int
    goal: str = "untargeted"
    target: int = -1
    answered_label: int = -1
    model_label: int = -1
    claimed: bool = False
    fooled: bool = False
    success: bool = False
    queries: int = 0
    forwarded: int = 0
    cached: int = 0
    refused: int = 0
    l0: int = 0
    l2: float = 0.0
    seconds: float = 0.0
    seed: int = 0
    session: str = ""
    extra: dict = field(default_factory=dict)

    def meets_goal(self, label: int) -> bool:
        if label < 0:  # a refused query is no answer
            return False
        return label == self.target if self.goal == "target" else label != self.true_label

    def judge(self, answered: int, model_label: int) -> "Row":
        """Set the labels, ``claimed``, ``fooled`` and ``success`` (the one definition)."""
        self.answered_label, self.model_label = int(answered), int(model_label)
        self.claimed, self.fooled = self.meets_goal(self.answered_label), self.meets_goal(self.model_label)
        self.success = self.claimed and self.fooled
        return self


def distances(x0: np.ndarray, x1: np.ndarray) -> tuple[int, float]:
    """(pixel positions changed, L2 on the 0-1 scale) between two HWC 0-255 images."""
    d = np.asarray(x1, np.float64) - np.asarray(x0, np.float64)
    return int(np.any(d != 0, axis=-1).sum()), float(np.sqrt(np.sum((d / 255.0) ** 2)))


@dataclass(frozen=True)
class Cell:
    experiment: str
    model: str
    setting: str
    defense: str

    @property
    def key(self) -> str:
        safe = lambda s: re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(s))  # noqa: E731
        return f"{safe(self.experiment)}/{safe(self.model)}/{safe(self.setting)}__{safe(self.defense)}"


def run_cells(cells: Sequence[Cell], fn: Callable[[Cell], list[Row]], results_dir: str | os.PathLike, *,
              progress: bool = True) -> list[Row]:
    """Run ``fn(cell)`` for every cell whose result file is missing; return every finished
    cell's rows. Sittings may share ``results_dir``: a cell is claimed (``<key>.claim``, made
    exclusively, holding the process id) while it runs, and a sitting passes over a cell
    another live process on this host has claimed, so two sittings of one table split its
    cells between them (a dead sitting's claim is taken over)."""
    from tqdm.auto import tqdm

    root = Path(results_dir)
    out: list[Row] = []
    todo = [c for c in cells if not (root / f"{c.key}.json").exists()]
    t0, done = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc=f"cells ({len(cells) - len(todo)} of {len(cells)} already done)",
               disable=not progress, leave=False)
    for cell in cells:
        path = root / f"{cell.key}.json"
        if path.exists():
            out += load(path)
            continue
        claim = _claim(path.with_suffix(".claim"))
        if claim is None:
            if progress:
                print(f"cell {cell.key}: another sitting runs it; passed over", flush=True)
            continue
        try:
            if path.exists():  # finished by another sitting between the two checks
                out += load(path)
                continue
            t1 = time.perf_counter()
            rows = fn(cell)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"cell": asdict(cell), "rows": [asdict(r) for r in rows]}, default=_json))
            tmp.replace(path)  # atomic: a killed run never leaves half a cell
        finally:
            claim.unlink(missing_ok=True)
        out += rows
        done += 1
        per = (time.perf_counter() - t0) / done
        bar.update(1)
        bar.set_postfix_str(f"{per:.1f}s/cell")
        if progress:  # one line per cell too, for logs (the bar's ETA is over the cells still to run)
            print(f"cell {cell.key}: {len(rows)} rows in {time.perf_counter() - t1:.0f} s; {len(todo) - done} to go, "
                  f"ETA {per * (len(todo) - done) / 60:.0f} min", flush=True)
    bar.close()
    return out


def _claim(path: Path) -> Path | None:
    """``path`` made exclusively with this process's id in it, or ``None`` when a live process
    holds it; a claim whose process is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return None
            path.unlink(missing_ok=True)  # stale: its sitting died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str | os.PathLike) -> list[Row]:
    names = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in json.loads(Path(path).read_text())["rows"]]


def frame(rows: Iterable[Row]):
    import pandas as pd

    return pd.DataFrame([{**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra} for r in rows])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials ((nan, nan) for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def summarize(rows: Iterable[Row], by: Sequence[str] = ("experiment", "attack", "model", "setting", "defense"),
              unit: str | None = None):
    """Per group: n, successes, asr (= success rate) with its Wilson interval, claimed and fooled
    rates, mean queries and the forwarded fraction. ``unit="image_index"``: an image counts once,
    as a success when any of its rows is one."""
    import pandas as pd

    df = frame(rows)
    out = []
    if df.empty:  # e.g. a sitting whose cells all ran in another sitting (``run_cells``' claims)
        return pd.DataFrame(columns=[*by, "n", "successes", "asr", "asr_lo", "asr_hi", "claimed_rate",
                                     "fooled_rate", "mean_queries", "forwarded_fraction"])
    for keys, g in df.groupby(list(by), sort=False):
        u = g.groupby(unit)[["success", "claimed", "fooled"]].any() if unit else g
        k, n = int(u.success.sum()), len(u)
        lo, hi = wilson(k, n)
        q = g.queries.sum()
        out.append({**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))), "n": n, "successes": k,
                    "asr": k / n if n else float("nan"), "asr_lo": lo, "asr_hi": hi,
                    "claimed_rate": float(u.claimed.mean()), "fooled_rate": float(u.fooled.mean()),
                    "mean_queries": float(g.queries.mean()),
                    "forwarded_fraction": float(g.forwarded.sum() / q) if q else float("nan")})
    return pd.DataFrame(out)


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, Path)):
        return o.tolist() if isinstance(o, np.ndarray) else str(o)
    raise TypeError(type(o))
