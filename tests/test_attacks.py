"""Attacks, harness, paper tables, and the client/stack against real servers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lab.attacks import CallablePredictor, CountingPredictor, jsma, onepixel

REPO = Path(__file__).resolve().parents[1]
SHARED_PAPER = REPO.parent / "shared" / "paper"


# -- toy predictors -------------------------------------------------------------

class NeedlePredictor:
    """Class 3 wins only when a red pixel is set near (x=21, y=9) of ``original``; else class 1."""

    def __init__(self, original: np.ndarray) -> None:
        self.original = original
        yy, xx = np.mgrid[:32, :32]
        self.w = np.exp(-((xx - 21) ** 2 + (yy - 9) ** 2) / (2 * 6.0 ** 2))
        self.query_count = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        self.query_count += len(images)
        changed = (images.astype(int) != self.original.astype(int)).any(-1)
        z = (self.w * changed * images[..., 0] / 255.0).sum((1, 2))
        logits = np.zeros((len(images), 10))
        logits[:, 1] = 2.0
        logits[:, 3] = 2.0 + 30 * (z - 0.9)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


class LinearSoftmax:
    """softmax(W x / 255 + b): a predictor and its exact gradients, without TensorFlow."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.normal(0, 1, (10, 32 * 32 * 3)) / 30
        self.b = rng.normal(0, 0.1, 10)
        self.query_count = 0

    def _p(self, images):
        z = images.reshape(len(images), -1).astype(float) / 255 @ self.W.T + self.b
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, images):
        self.query_count += len(images)
        return self._p(np.asarray(images))

    def target_gradient(self, image, target):
        p = self._p(np.asarray(image)[None])[0]
        g = (self.W[target] - p @ self.W) / 255
        return g.reshape(image.shape)


@pytest.fixture
def orig():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[..., 0] = 20
    return img


# -- One Pixel Attack --------------------------------------------------------------

def test_apply_sets_exactly_the_candidate_pixels(orig):
    cand = np.array([[[3, 5, 1, 2, 3], [31, 0, 255, 0, 7]]])
    out = onepixel.apply(orig, cand)[0]
    assert tuple(out[5, 3]) == (1, 2, 3) and tuple(out[0, 31]) == (255, 0, 7)
    diff = (out != orig).any(-1)
    assert diff.sum() <= 2 and diff[5, 3] and diff[0, 31]


def test_decode_respects_bounds():
    unit = np.array([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.5] * 5])
    t = onepixel.decode(unit, 1)
    assert t.min() >= 0 and t[:, 0, :2].max() <= 31 and t[:, 0, 2:].max() <= 255
    assert t[1, 0].tolist() == [31, 31, 255, 255, 255]


def test_two_others_are_distinct():
    rng = np.random.default_rng(0)
    for n in (4, 5, 40):
        r1, r2 = onepixel._two_others(rng, n)
        i = np.arange(n)
        assert (r1 != i).all() and (r2 != i).all() and (r1 != r2).all()


@pytest.mark.parametrize("seed", range(4))
def test_de_finds_a_known_target(orig, seed):
    pred = NeedlePredictor(orig)
    cfg = onepixel.DEConfig(popsize=40, maxiter=40)
    r = onepixel.attack(pred, orig, 1, pixels=1, target=3, config=cfg, rng=seed)
    assert r.success and r.label == 3 and r.early_stop
    x, y = r.candidate[0, :2]
    assert abs(x - 21) <= 3 and abs(y - 9) <= 3
    # stopped at the first success: whole generations plus one verdict query
    assert r.queries == pred.query_count == 40 * (r.generations + 1) + 1
    assert r.generations < cfg.maxiter


def test_de_gives_up_after_maxiter_and_reports_failure(orig):
    pred = NeedlePredictor(orig)
    r = onepixel.attack(pred, orig, 1, pixels=1, target=5, config=onepixel.DEConfig(popsize=8, maxiter=3), rng=0)
    assert not r.success and not r.early_stop and r.generations == 3
    assert r.queries == 8 * 4 + 1 and r.label == 1
    assert (r.image != orig).any(-1).sum() <= 1


def test_de_untargeted_criterion(orig):
    pred = NeedlePredictor(orig)
    r = onepixel.attack(pred, orig, 1, pixels=3, target=3, criterion="misclassify",
                        config=onepixel.DEConfig(popsize=40, maxiter=40), rng=1)
    assert r.success and r.label != 1 and r.criterion == "misclassify"
    with pytest.raises(ValueError):
        onepixel.attack(pred, orig, 1, target=1)


def test_de_is_reproducible(orig):
    a = onepixel.attack(NeedlePredictor(orig), orig, 1, target=3, config=onepixel.DEConfig(popsize=20, maxiter=5), rng=7)
    b = onepixel.attack(NeedlePredictor(orig), orig, 1, target=3, config=onepixel.DEConfig(popsize=20, maxiter=5), rng=7)
    assert a.queries == b.queries and (a.candidate == b.candidate).all()


# -- JSMA -------------------------------------------------------------------------

@pytest.mark.parametrize("theta,gamma", [(0.1, 0.02), (0.4, 0.05), (0.2, 1.0)])
def test_jsma_changes_at_most_the_budgeted_features(orig, theta, gamma):
    model = LinearSoftmax(1)
    pred = CountingPredictor(model)
    true = int(model.predict(orig[None]).argmax())
    target = (true + 1) % 10
    r = jsma.attack(pred, model, orig, true, target, theta=theta, gamma=gamma, max_iter=300)
    diff = r.image.astype(int) - orig.astype(int)
    changed = int((diff != 0).sum())
    budget = int(gamma * orig.size) + 2  # ART checks the budget before each pair step
    assert changed <= r.features_changed <= budget
    assert (diff >= 0).all(), "theta > 0 only increases features"
    step = jsma.step_levels(theta)
    # each changed feature moved by a multiple of the step, or was clipped at 255
    moved = diff[diff != 0]
    at_top = r.image[diff != 0] == 255
    assert ((moved % step == 0) | at_top).all()
    assert r.pixels_changed == int((diff != 0).any(-1).sum()) or r.pixels_changed >= (diff != 0).any(-1).sum()
    # one query for the clean image, then one per iteration, all through the predictor
    assert r.queries == r.iterations + 1 == pred.query_count == len(r.labels)
    assert r.success == (r.label == target) and r.label == r.labels[-1]


def test_jsma_stops_at_the_target_and_caps_iterations(orig):
    model = LinearSoftmax(2)
    true = int(model.predict(orig[None]).argmax())
    target = (true + 3) % 10
    r = jsma.attack(model, model, orig, true, target, theta=0.4, gamma=1.0)
    assert r.success and r.stop == "target"
    assert all(lab != target for lab in r.labels[:-1])
    capped = jsma.attack(model, model, orig, true, target, theta=0.1, gamma=1.0, max_iter=2)
    assert capped.iterations <= 2 and capped.queries <= 3


def test_jsma_gradients_from_an_exported_savedmodel(model_base, test_images):
    g = jsma.TFGradients(model_base / "tiny" / "1")
    img = test_images[0]
    grad = g.target_gradient(img.astype(np.float32), 4)
    assert grad.shape == img.shape and np.isfinite(grad).all() and np.abs(grad).sum() > 0
    pred = CountingPredictor(CallablePredictor(g.scores))
    true = int(pred.predict(img[None]).argmax())
    r = jsma.attack(pred, g, img, true, (true + 1) % 10, theta=0.3, gamma=0.02)
    assert r.features_changed <= int(0.02 * img.size) + 2
    assert r.queries == pred.query_count - 1


def test_jsma_theta_mapping():
    assert [jsma.step_levels(t) for t in (0.1, 0.2, 0.3, 0.4)] == [26, 51, 76, 102]


# -- harness (offline: a judged local predictor stands in for the sidecar) ------------

class JudgedPredictor:
    """The paper's judgment applied locally with sidecar.judgment (one session), for tests."""

    def __init__(self, inner, defended: bool) -> None:
        from sidecar.judgment import Thresholds

        self.inner = inner
        self.defended = defended
        self.anchors = ()
        self.thresholds = Thresholds()
        self.query_count = 0
        self.forwards = 0

    def predict(self, images):
        from sidecar.judgment import Fingerprint, plan, resolve

        images = np.asarray(images)
        self.query_count += len(images)
        if not self.defended:
            self.forwards += len(images)
            return self.inner.predict(images)
        p = plan(self.anchors, [Fingerprint.of(im) for im in images], self.thresholds)
        fwd = np.stack([f.image for f in p.forwarded]) if p.forwarded else None
        res = list(self.inner.predict(fwd)) if fwd is not None else []
        self.forwards += len(res)
        answers, self.anchors = resolve(p, res)
        return np.stack(answers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class FakeEndpoints:
    def __init__(self, model, models_dir):
        self.model = model
        self.models_dir = Path(models_dir)
        self.made = []

    def predictor(self, name, model, session_id=None, batch=True):
        p = JudgedPredictor(self.model, defended=(name == "defended"))
        p.name = name
        self.made.append(p)
        return p


def _toy_data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_harness_counts_queries_and_defense_never_helps_the_attacker(tmp_path):
    from lab import harness

    model = LinearSoftmax(3)
    x = _toy_data(30)
    y = model.predict(x).argmax(1)
    y[:5] = (y[:5] + 1) % 10  # five "misclassified" images must never be attacked
    ep = FakeEndpoints(model, tmp_path)
    rows, stats = harness.run_onepixel(ep, "toy", x, y, targeted=False, pixels=[1, 3], n_images=4,
                                       popsize=12, maxiter=3, seed=0, targets_per_image=3, progress=False)
    assert stats["selected"] == 4 and all(r["image_index"] >= 5 for r in rows)
    attack_preds = [p for p in ep.made if p is not ep.made[0]]
    assert sum(r["queries"] for r in rows) == sum(p.query_count for p in attack_preds)
    assert len(rows) == 2 * 2 * 4 * 3  # pixels x defenses x images x targets
    table = harness.summarize(rows, "onepixel_untargeted", profile="test", models_dir=tmp_path)
    assert list(table.columns[:4]) == harness.PAPER_COLUMNS["onepixel_untargeted"]
    assert (table.asr_with_defense <= table.asr_without_defense).all()
    defended = [p for p in attack_preds if p.name == "defended"]
    assert all(p.forwards < p.query_count for p in defended)  # the judgment cached something


def test_harness_jsma_rows(tmp_path):
    from lab import harness

    model = LinearSoftmax(4)
    x = _toy_data(12, 1)
    y = model.predict(x).argmax(1)
    ep = FakeEndpoints(model, tmp_path)
    rows, stats = harness.run_jsma(ep, "toy", x, y, thetas=[0.1, 0.4], n_images=3, gamma=0.05, max_iter=20,
                                   progress=False, gradients=model)
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["queries"] == r["iterations"] + 1
        assert r["features_changed"] <= int(0.05 * 3072) + 2
    table = harness.summarize(rows, "jsma", profile="test", models_dir=tmp_path, selection={"toy": stats})
    assert list(table.columns[:4]) == ["model", "theta", "asr_without_defense", "asr_with_defense"]
    assert set(table.theta) == {0.1, 0.4} and (table.profile == "test").all()


def test_select_correct_excludes_misclassified():
    from lab.harness import select_correct

    model = LinearSoftmax(5)
    x = _toy_data(40, 2)
    y = model.predict(x).argmax(1)
    y[::2] = (y[::2] + 1) % 10
    idx, stats = select_correct(model, x, y, None, np.random.default_rng(0), chunk=7)
    assert sorted(idx.tolist()) == list(range(1, 40, 2))
    assert stats["examined"] == 40 and stats["selection_accuracy"] == 0.5


# -- paper tables -------------------------------------------------------------------

@pytest.mark.parametrize("section,fname", [("jsma", "table1_jsma.csv"),
                                           ("onepixel_targeted", "table2_onepixel_targeted.csv"),
                                           ("onepixel_untargeted", "table3_onepixel_untargeted.csv")])
def test_paper_tables_match_the_shared_csvs(section, fname):
    from lab import paper_tables

    ours = paper_tables.rows(section)
    assert ours and set(ours[0]) >= {"model", "asr_without_defense", "asr_with_defense"}
    path = SHARED_PAPER / fname
    if not path.exists():
        pytest.skip(f"{path} not available")
    with open(path) as f:
        theirs = list(csv.DictReader(f))
    param = paper_tables.TABLES[section][0]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["model"] == b["model"] and float(a[param]) == float(b[param])
        assert a["asr_without_defense"] == pytest.approx(float(b["asr_without_defense"]))
        assert a["asr_with_defense"] == pytest.approx(float(b["asr_with_defense"]))


# -- client and stack against real servers --------------------------------------------

@pytest.fixture(scope="module")
def stack(model_base):
    from lab.harness import PAPER_OUTPUT_ARGS
    from lab.stack import SidecarSpec, Stack

    exact = tuple(PAPER_OUTPUT_ARGS)
    specs = [SidecarSpec("defended", "paper", args=exact), SidecarSpec("undefended", "off", args=exact),
             SidecarSpec("padded", "paper", padding="distribution")]  # the sidecar's default output policy
    with Stack(model_base, ["tiny", "other"], sidecars=specs, startup_timeout=240) as st:
        yield st
    for p in [st.serving, *st.sidecars.values()]:
        assert p.popen.poll() is not None, f"{p.name} still running after the stack closed"


@pytest.mark.integration
def test_stack_predictor_and_metrics(stack, test_images):
    from lab.client import CACHE_ANSWERS, FORWARDS

    x = test_images[:6]
    m = stack.metrics("defended")
    before = m.counters(model="tiny")
    with stack.predictor("defended", "tiny") as p:
        s = p.predict(x)
        assert s.shape == (6, 10) and np.allclose(s.sum(1), 1, atol=1e-4)
        assert (p.last_labels == s.argmax(1)).all()
        near = x[5].copy()  # x[5] is the session's anchor now
        near[4, 4] = 255 - near[4, 4]
        far = x[1]
        s2 = p.predict(np.stack([near, far]))
        assert p.query_count == 8 and p.call_count == 2
    after = m.counters(model="tiny")
    assert after[FORWARDS] - before[FORWARDS] == 7  # 6 fresh + far; near was answered from the cache
    assert after[CACHE_ANSWERS] - before[CACHE_ANSWERS] == 1
    assert np.array_equal(s2[0], s[5])  # the anchor's answer, exact scores
    assert np.allclose(s2[1], s[1], atol=1e-5)  # far went to the model again


@pytest.mark.integration
def test_unary_batch_and_sessions_agree(stack, test_images):
    x = test_images[10:14]
    with stack.predictor("undefended", "tiny", batch=False) as p:
        unary = p.predict(x)
        assert p.call_count == 4 and len(p.latencies) == 4
        other = p.new_session()
        assert other.session_id != p.session_id
        batch = other.predict(x)
    assert np.allclose(unary, batch, atol=1e-5)
    with stack.predictor("undefended", "other") as q:
        assert q.predict(x).shape == (4, 5)


@pytest.mark.integration
def test_benign_and_timing_against_the_stack(stack, test_images, cifar):
    from lab import benign, timing
    from lab.harness import Endpoints

    ep = Endpoints.from_json(stack.endpoints())
    summary, per_image = benign.run(ep, "tiny", cifar.x_test[:30], cifar.y_test[:30], progress=False)
    assert summary["n_images"] == 30 and summary["undefended_cached_answers"] == 0
    assert 0 <= summary["cached_fraction"] <= 1
    assert summary["cached_wrong"] <= summary["cached_answers"]
    imgs, expected, _ = timing.probe_images(cifar.x_test, 20, np.random.default_rng(0))
    with ep.predictor("padded", "tiny", batch=False) as p:
        res = timing.measure(p, ep.metrics("padded"), "tiny", imgs, progress=False)
    assert (res["cached"] == expected).all()
    # a cached answer carries the anchor's label even where shown scores are perturbed
    assert (res["label"][1::2] == res["label"][0::2]).all()
    a = timing.analyse(res["latency_s"], res["cached"])
    assert a["n_cached"] == 10 and 0 <= a["ks_pvalue"] <= 1


@pytest.mark.integration
def test_stack_reports_a_failing_process_with_its_log(model_base, tmp_path):
    from lab.stack import SidecarSpec, Stack, StackError

    st = Stack(model_base, ["tiny"], sidecars=[SidecarSpec("bad", "paper", args=("--threshold", "banana"))],
               startup_timeout=120, log_dir=tmp_path)
    with pytest.raises(StackError) as err:
        with st:
            pass
    msg = str(err.value)
    assert "sidecar-bad" in msg and "banana" in msg
    assert st.serving is not None and st.serving.popen.poll() is not None


def test_stack_rejects_missing_models(tmp_path):
    from lab.stack import Stack, StackError

    with pytest.raises(StackError, match="models not found"):
        with Stack(tmp_path, ["nope"]):
            pass


def test_model_config_text(tmp_path):
    from lab.stack import model_config_text

    text = model_config_text({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert text.count("config {") == 2 and f'base_path: "{(tmp_path / "a").resolve()}"' in text


def test_parse_metrics_sums_label_sets():
    from lab.client import Metrics, parse_metrics

    text = ("# TYPE hashguard_cache_answers counter\n"
            'hashguard_cache_answers_total{model="m",mode="paper",source="session"} 3.0\n'
            'hashguard_cache_answers_total{model="m",mode="paper",source="index"} 2.0\n'
            'hashguard_cache_answers_total{model="n",mode="paper",source="session"} 7.0\n')
    samples = parse_metrics(text)
    assert Metrics.total(samples, "hashguard_cache_answers_total", model="m") == 5.0
    assert Metrics.total(samples, "hashguard_cache_answers_total") == 12.0


def test_success_verdicts_come_from_the_answered_labels(orig):
    """Shown scores may be perturbed; the service's label decides success."""
    from lab.attacks import answer_labels

    class Relabelled(NeedlePredictor):
        def predict(self, images):
            scores = super().predict(images)
            self.last_labels = np.full(len(images), 7)
            return scores

    p = Relabelled(orig)
    assert (answer_labels(p, p.predict(orig[None])) == 7).all()
    r = onepixel.attack(p, orig, 1, pixels=1, target=7, config=onepixel.DEConfig(popsize=8, maxiter=3), rng=0)
    assert r.success and r.label == 7 and r.generations == 0
    assert (answer_labels(object(), np.eye(10)[[2, 5]]) == [2, 5]).all()


@pytest.mark.integration
def test_harness_query_counts_match_the_sidecars_counters(stack, cifar):
    from lab import harness
    from lab.client import CACHE_ANSWERS, FORWARDS

    ep = harness.Endpoints.from_json(stack.endpoints())
    before = {n: ep.metrics(n).counters(model="tiny") for n in ("defended", "undefended")}
    rows, stats = harness.run_onepixel(ep, "tiny", cifar.x_test[:200], cifar.y_test[:200], targeted=True,
                                       pixels=[1, 3], n_images=3, popsize=10, maxiter=2, seed=0, progress=False)
    after = {n: ep.metrics(n).counters(model="tiny") for n in ("defended", "undefended")}
    delta = {n: sum(after[n][k] - before[n][k] for k in (FORWARDS, CACHE_ANSWERS)) for n in after}
    sent = {n: sum(r["queries"] for r in rows if r["sidecar"] == n) for n in delta}
    assert sent["defended"] == delta["defended"]
    assert sent["undefended"] + stats["queries"] == delta["undefended"]  # selection asks the undefended path
    defended = [r for r in rows if r["sidecar"] == "defended"]
    # per image, the paper's judgment forwards only the first candidate; the rest are cached
    assert after["defended"][FORWARDS] - before["defended"][FORWARDS] <= len(defended)

