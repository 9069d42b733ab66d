"""One Pixel Attack (Su, Vargas and Sakurai) with a small vectorised differential evolution.

A candidate is ``pixels`` tuples (x, y, r, g, b); applying it sets those pixels of
the original image. The search is the DE the paper used (the one of the
one-pixel-attack-keras study): strategy best1bin, mutation factor dithered
uniformly in ``mutation`` once per generation, recombination 1 (so a trial is the
mutant vector itself), Latin-hypercube initial population, deferred updating
(a generation's trials are judged together), and parameters that leave their
bounds replaced by a uniform draw (scipy's rule). Differences from
``scipy.optimize.differential_evolution``: ``popsize`` is the total population
(the study asked scipy for about 400 in all), every population goes to the
predictor as ONE batch, and the search stops at the first candidate whose answer
satisfies the success criterion, right after the batch that contained it.

Fitness (minimised): with a target, 1 - score[target]; without one, score[true].
Success is judged on the service's answered labels (``answer_labels``), not on
the argmax of possibly perturbed scores.

Success criteria:
- ``"target"``: the answer equals the target (targeted attack, Table 2);
- ``"misclassify"``: the answer differs from the true label (untargeted, Table 3;
  the paper runs the targeted search towards each wrong label and counts any
  answer other than the true label).

The verdict is the predictor's answer to the returned image (one more query, in
the same session, unless ``verify=False``): for a defended service it is what the
attacker would actually get back for that image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Predictor, answer_labels, as_batch

CRITERIA = ("target", "misclassify")


@dataclass(frozen=True)
class DEConfig:
    popsize: int = 400  # total population
    maxiter: int = 75  # generations after the initial population
    mutation: tuple[float, float] = (0.5, 1.0)
    recombination: float = 1.0
    init: str = "latinhypercube"  # or "random"

    def __post_init__(self) -> None:
        if self.popsize < 4:
            raise ValueError("best1bin needs a population of at least 4")
        if self.maxiter < 0:
            raise ValueError("maxiter must be >= 0")
        if self.init not in ("latinhypercube", "random"):
            raise ValueError(f"unknown init {self.init!r}")


@dataclass
class OnePixelResult:
    success: bool
    label: int  # the predictor's final answer for ``image``
    true_label: int
    target: int | None
    criterion: str
    pixels: int
    queries: int  # images sent to the predictor, verdict included
    generations: int  # DE generations run after the initial population
    early_stop: bool  # a candidate met the criterion during the search
    best_fitness: float
    candidate: np.ndarray  # (pixels, 5) ints: x, y, r, g, b
    image: np.ndarray = field(repr=False)  # the returned (adversarial) image, uint8


def bounds(pixels: int, height: int = 32, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper bounds (upper exclusive) of a flat candidate of ``pixels`` tuples."""
    lo = np.zeros(5 * pixels)
    hi = np.tile([width, height, 256, 256, 256], pixels).astype(float)
    return lo, hi


def decode(unit: np.ndarray, pixels: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Unit-cube candidates (n, 5*pixels) -> integer tuples (n, pixels, 5)."""
    lo, hi = bounds(pixels, height, width)
    vals = np.floor(lo + np.clip(unit, 0.0, 1.0) * (hi - lo))
    vals = np.minimum(vals, hi - 1)
    return vals.astype(np.int64).reshape(len(unit), pixels, 5)


def apply(image: np.ndarray, tuples: np.ndarray) -> np.ndarray:
    """Copies of ``image`` with each candidate's pixels set: (n, pixels, 5) -> (n, h, w, 3)."""
    tuples = np.asarray(tuples)
    if tuples.ndim == 2:
        tuples = tuples[None]
    n, k, _ = tuples.shape
    out = np.repeat(np.asarray(image, dtype=np.uint8)[None], n, axis=0)
    rows = np.repeat(np.arange(n), k)
    xs = tuples[:, :, 0].reshape(-1)
    ys = tuples[:, :, 1].reshape(-1)
    out[rows, ys, xs] = tuples[:, :, 2:5].reshape(-1, 3).astype(np.uint8)
    return out


def _init_population(rng: np.random.Generator, n: int, dim: int, how: str) -> np.ndarray:
    if how == "random":
        return rng.random((n, dim))
    # Latin hypercube: one sample per stratum of every dimension, strata shuffled.
    samples = (rng.random((n, dim)) + np.arange(n)[:, None]) / n
    for d in range(dim):
        samples[:, d] = samples[rng.permutation(n), d]
    return samples


def _two_others(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every i, two indices r1 != r2, both != i, uniformly."""
    i = np.arange(n)
    a = rng.integers(1, n, size=n)  # offset of r1 in 1..n-1
    b = rng.integers(1, n - 1, size=n)  # offset of r2 in 1..n-1 without a
    b = b + (b >= a)
    return (i + a) % n, (i + b) % n


class _Evaluator:
    def __init__(self, predictor: Predictor, image: np.ndarray, pixels: int, true_label: int,
                 target: int | None, criterion: str) -> None:
        self.predictor = predictor
        self.image = np.asarray(image, dtype=np.uint8)
        self.pixels = pixels
        self.true_label = true_label
        self.target = target
        self.criterion = criterion
        self.queries = 0
        h, w = self.image.shape[:2]
        self.hw = (h, w)

    def success(self, labels: np.ndarray) -> np.ndarray:
        if self.criterion == "target":
            return labels == self.target
        return labels != self.true_label

    def __call__(self, unit: np.ndarray):
        tuples = decode(unit, self.pixels, *self.hw)
        images = apply(self.image, tuples)
        scores = np.asarray(self.predictor.predict(images), dtype=np.float64)
        self.queries += len(images)
        if self.target is not None:
            fitness = 1.0 - scores[:, self.target]
        else:
            fitness = scores[:, self.true_label]
        labels = answer_labels(self.predictor, scores)
        return fitness, labels, tuples, images


def attack(predictor: Predictor, image: np.ndarray, true_label: int, *, pixels: int = 1,
           target: int | None = None, criterion: str | None = None, config: DEConfig = DEConfig(),
           rng: np.random.Generator | int | None = None, verify: bool = True) -> OnePixelResult:
    """Run the One Pixel Attack on one image.

    ``criterion`` defaults to ``"target"`` when a target is given, else ``"misclassify"``.
    """
    rng = np.random.default_rng(rng)
    image = as_batch(image)[0]
    if criterion is None:
        criterion = "target" if target is not None else "misclassify"
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    if criterion == "target" and target is None:
        raise ValueError("criterion 'target' needs a target")
    if target is not None and target == true_label:
        raise ValueError("target equals the true label")
    ev = _Evaluator(predictor, image, pixels, int(true_label), target, criterion)
    dim = 5 * pixels
    n = config.popsize

    pop = _init_population(rng, n, dim, config.init)
    fit, labels, tuples, images = ev(pop)
    hit = np.flatnonzero(ev.success(labels))
    generations = 0
    found: int | None = int(hit[0]) if hit.size else None
    found_tuples, found_image, found_label = (
        (tuples[found], images[found], int(labels[found])) if found is not None else (None, None, -1))

    while found is None and generations < config.maxiter:
        generations += 1
        f = rng.uniform(*config.mutation)
        best = int(np.argmin(fit))
        r1, r2 = _two_others(rng, n)
        mutant = pop[best][None, :] + f * (pop[r1] - pop[r2])
        if config.recombination >= 1.0:
            trial = mutant
        else:
            cross = rng.random((n, dim)) < config.recombination
            cross[np.arange(n), rng.integers(0, dim, size=n)] = True
            trial = np.where(cross, mutant, pop)
        out = (trial < 0.0) | (trial > 1.0)
        if out.any():
            trial[out] = rng.random(int(out.sum()))
        t_fit, t_labels, t_tuples, t_images = ev(trial)
        hit = np.flatnonzero(ev.success(t_labels))
        if hit.size:
            found = int(hit[0])
            found_tuples, found_image, found_label = t_tuples[found], t_images[found], int(t_labels[found])
        better = t_fit <= fit
        pop[better] = trial[better]
        fit[better] = t_fit[better]

    early = found is not None
    if early:
        cand, adv = found_tuples, found_image
    else:
        best = int(np.argmin(fit))
        cand = decode(pop[best:best + 1], pixels, *ev.hw)[0]
        adv = apply(image, cand[None])[0]
    if verify:
        scores = np.asarray(predictor.predict(adv[None]))
        ev.queries += 1
        label = int(answer_labels(predictor, scores)[0])
    else:
        label = found_label  # -1 when nothing met the criterion (no verdict asked)
    success = bool(ev.success(np.array([label]))[0]) if label >= 0 else False
    return OnePixelResult(
        success=success, label=label, true_label=int(true_label), target=target,
        criterion=criterion, pixels=pixels, queries=ev.queries, generations=generations,
        early_stop=early, best_fitness=float(fit.min()), candidate=np.asarray(cand), image=adv,
    )
