"""Adaptive attack strategies (workbook 06) and the OARS-style attack (07).

Routing is checked with a recording fake transport; the strategies' effect on the
judgment layer with real in-process sidecars (``lab.adaptive.LocalSidecar``) in
front of `python -m serving` with the tiny test model.
"""

from __future__ import annotations

import numpy as np
import pytest

from lab import adaptive as A
from lab import oars as O
from lab.attacks import onepixel as op
from sidecar.judgment import PAPER_THRESHOLD
from sidecar.phash import hamming, phash, pixel_diff


class RecordingTransport:
    """Answers every image with label = (sum of pixels) mod 10 and a one-hot score."""

    def __init__(self):
        self.calls: list[tuple[str, np.ndarray]] = []

    @staticmethod
    def answer(images):
        labels = np.array([int(im.astype(np.int64).sum() % 10) for im in images])
        scores = np.eye(10, dtype=np.float32)[labels]
        return labels, scores

    def batch(self, session, images):
        images = np.asarray(images)
        self.calls.append((session, images.copy()))
        return self.answer(images)

    def many(self, calls):
        return [self.batch(s, im) for s, im in calls]


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_plain_keeps_one_session():
    t = RecordingTransport()
    s = A.Plain(t)
    s.predict(images(5))
    s.predict(images(3, 1))
    assert len(t.calls) == 2 and len({c[0] for c in t.calls}) == 1
    assert s.query_count == s.sent == 8


def test_interleave_sends_a_decoy_before_every_candidate():
    t = RecordingTransport()
    decoys = images(7, seed=9)
    cand = images(5)
    s = A.Interleave(t, decoys, rng=0)
    scores = s.predict(cand)
    (session, sent), = t.calls  # ONE ClassifyBatch: judged in order within the session
    assert len(sent) == 10
    assert all(any(np.array_equal(d, k) for k in decoys) for d in sent[0::2])
    assert np.array_equal(sent[1::2], cand)
    labels, want = RecordingTransport.answer(cand)
    assert np.array_equal(s.last_labels, labels) and np.array_equal(scores, want)  # candidates' answers only
    assert s.query_count == 5 and s.sent == 10 and s.decoys_sent == 5


def test_fresh_session_uses_a_new_session_per_candidate():
    t = RecordingTransport()
    s = A.FreshSession(t)
    cand = images(6)
    s.predict(cand)
    s.predict(cand[:2])
    assert len(t.calls) == 8 and all(len(im) == 1 for _, im in t.calls)
    assert len({sess for sess, _ in t.calls}) == 8 == len(s.sessions)
    assert np.array_equal(np.concatenate([im for _, im in t.calls[:6]]), cand)
    assert np.array_equal(s.last_labels, RecordingTransport.answer(cand[:2])[0])


def test_accounts_round_robin_across_predicts():
    t = RecordingTransport()
    s = A.Accounts(t, ["a", "b", "c"])
    first, second = images(4), images(4, 1)
    s.predict(first)
    out = s.predict(second)
    # candidate j of the attack goes to account j mod 3, in order, across calls
    sent = {}
    for sess, ims in t.calls:
        sent.setdefault(sess, []).extend(ims)
    stream = np.concatenate([first, second])
    for k, name in enumerate("abc"):
        assert np.array_equal(np.stack(sent[name]), stream[k::3])
    assert np.array_equal(out, RecordingTransport.answer(second)[1])  # answers back in candidate order


def test_shift_image_moves_and_pads_with_edges():
    img = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
    right = A.shift_image(img, 1, 0)
    assert np.array_equal(right[:, 1:], img[:, :-1]) and np.array_equal(right[:, 0], img[:, 0])
    down = A.shift_image(img, 0, 2)
    assert np.array_equal(down[2:], img[:-2]) and np.array_equal(down[0], img[0])


def test_blinding_ensure_passes_the_thresholds_by_construction(test_images):
    t = RecordingTransport()
    img = test_images[3]
    s = A.Blinding(t, A.BlindSpec("ensure", max_shift=1, brightness=4, sigma=4, ensure=True), rng=0)
    s.reset(img)
    for _ in range(30):  # the worst case: the same candidate over and over
        s.predict(img[None])
    sent = np.concatenate([im for _, im in t.calls])
    assert s.unsafe == 0
    hashes = [phash(im) for im in sent]
    for j in range(1, len(sent)):
        assert min(hamming(hashes[j], h) for h in hashes[:j]) > PAPER_THRESHOLD
        assert all(pixel_diff(sent[j], sent[i]) > PAPER_THRESHOLD for i in range(max(0, j - 8), j))
    assert len(s.records) == 30 and all(r["hash_distance"] > 0 for r in s.records)


def test_blinding_without_ensure_does_not_escalate(test_images):
    t = RecordingTransport()
    s = A.Blinding(t, A.BlindSpec("light", max_shift=0, brightness=0, sigma=2), rng=1)
    s.reset(test_images[4])
    s.predict(np.repeat(test_images[4][None], 5, axis=0))
    assert all(r["sigma_used"] == 2 and r["tries"] == 1 for r in s.records)


def test_cells_of_the_quick_profile():
    from lab import harness

    cfg = harness.config("adaptive", "quick")
    cells = A.onepixel_cells(cfg)
    got = {(c.label, c.mode) for c in cells}
    for s in ("interleave", "fresh_session", "accounts"):
        assert {(s, "paper"), (s, "hardened")} <= got
    assert {("plain", "off"), ("plain", "paper"), ("plain", "hardened")} <= got
    assert ("fresh_session:c1", "hardened") in got
    assert {c.sidecar for c in cells} == {"undefended", "defended", "hardened"}
    assert all(c.concurrency == 1 for c in cells if c.variant == "c1")


def test_budgeted_oracle_stops_and_keeps_the_closest_adversarial():
    class Fixed(A.Strategy):
        def _route(self, ims):
            labels = np.where(ims.reshape(len(ims), -1).mean(1) > 100, 1, 0)
            return labels, np.eye(10, dtype=np.float32)[labels]

    x = np.zeros((32, 32, 3), np.float32)
    o = A.BudgetedOracle(Fixed(None), x, true_label=0, budget=3)
    o(np.stack([x + 200, x + 150]))
    assert o.best_l2 == pytest.approx(np.linalg.norm(x + 150))
    with pytest.raises(A.BudgetExhausted):
        o(np.stack([x, x]))


# -- OARS ------------------------------------------------------------------------------

def test_replay_detector_and_margin():
    d = O.ReplayDetector()
    s = np.array([0.7, 0.2, 0.1], np.float32)
    assert not d(0, s, None) and d(0, s.copy(), None) and not d(0, s + 0.01, None)
    assert O.margin(np.array([0.2, 0.7, 0.1]), 0) < 0 < O.margin(s, 0)
    assert O.p_selection(0.05, 0, 1000) == 0.05 and O.p_selection(0.05, 999, 1000) < 0.001


def test_ladder_levels_grow(test_images):
    rng = np.random.default_rng(0)
    img = test_images[5]
    assert np.array_equal(O.ladder_transform(img, 0, rng), img)
    d1 = np.mean([hamming(phash(img), phash(O.ladder_transform(img, 1, rng))) for _ in range(10)])
    d6 = np.mean([hamming(phash(img), phash(O.ladder_transform(img, 6, rng))) for _ in range(10)])
    assert d1 > PAPER_THRESHOLD and d6 > d1


def linear_model(seed=0):
    w = np.random.default_rng(seed).normal(size=(32 * 32 * 3, 10)) / 3000

    def scores(img):
        z = (img.astype(np.float64).reshape(-1) / 255.0) @ w * 40
        p = np.exp(z - z.max())
        return p / p.sum()

    return scores


def test_square_attack_undefended_and_against_a_cache(test_images):
    f = linear_model()
    x = test_images[6]
    y = int(np.argmax(f(x)))

    def fresh(img):
        s = f(img).astype(np.float32)
        return int(np.argmax(s)), s

    r = O.square_attack(fresh, x, y, eps=16, budget=300, rng=np.random.default_rng(0))
    assert r.queries <= 300 and np.abs(r.image.astype(int) - x.astype(int)).max() <= 16
    assert r.claimed and int(np.argmax(f(r.image))) != y

    first = fresh(x)

    def cached(img):  # every answer replays the first one (an anchor that never moves)
        return first[0], first[1].copy()

    r2 = O.square_attack(cached, x, y, eps=16, budget=100, rng=np.random.default_rng(0))
    assert not r2.claimed and r2.queries == 100
    r3 = O.square_attack(cached, x, y, eps=16, budget=100, rng=np.random.default_rng(0),
                         detector=O.ReplayDetector(), max_resamples=3)
    assert not r3.claimed and r3.queries <= 100 and r3.detected_hits > 0 and r3.mean_level > 0


# -- real sidecars (in-process) --------------------------------------------------------

@pytest.fixture(scope="module")
def backend(model_base, tmp_path_factory):
    from servers import ServingProcess

    proc = ServingProcess(model_base, ["tiny"], tmp=tmp_path_factory.mktemp("cfg")).start()
    yield proc
    proc.stop()


EXACT = ("--output", "scores", "--score-precision", "0", "--score-noise", "0")


def run(strategy_factory, mode, images_, n_candidates=12, seed=0, **kw):
    with A.LocalSidecar(kw.pop("target"), mode, args=EXACT + tuple(kw.pop("args", ()))) as sc:
        t = A.GrpcTransport(sc.address, "tiny", concurrency=kw.pop("concurrency", 16), tokens=kw.pop("tokens", None))
        try:
            s = strategy_factory(t)
            x = images_[0]
            rng = np.random.default_rng(seed)
            cands = op.apply(x, op.decode(rng.random((n_candidates, 5)), 1))
            before = sc.counters("tiny")
            s.predict(cands)
            return s, A.counter_delta(sc.counters("tiny"), before)
        finally:
            t.close()


@pytest.mark.integration
def test_interleave_defeats_paper_mode_but_not_hardened(backend, test_images):
    decoys = test_images[100:140]
    _, plain = run(lambda t: A.Plain(t), "paper", test_images, target=backend.target)
    assert plain["forwards"] == 1  # the paper's attacker: one anchor answers the rest
    s, paper = run(lambda t: A.Interleave(t, decoys, rng=0), "paper", test_images, target=backend.target)
    assert paper["forwards"] == paper["images"] == 24  # every decoy AND every candidate reached the model
    _, hard = run(lambda t: A.Interleave(t, decoys, rng=0), "hardened", test_images, target=backend.target)
    assert hard["images"] == 24 and hard["forwards"] - 12 < 12  # candidates answered from the anchors


@pytest.mark.integration
def test_fresh_sessions_bypass_paper_mode_only(backend, test_images):
    s, paper = run(lambda t: A.FreshSession(t), "paper", test_images, target=backend.target)
    assert len(s.sessions) == 12 and paper["forwards"] == 12
    _, hard = run(lambda t: A.FreshSession(t), "hardened", test_images, target=backend.target, concurrency=1)
    assert hard["forwards"] < 12 and hard["cache_lookup"] > 0  # the cross-session index answers


@pytest.mark.integration
def test_accounts_as_authenticated_principals(backend, test_images, tmp_path):
    tokens = {f"acct{a}": f"tok{a}-{a * 7919}" for a in range(3)}
    path = tmp_path / "tokens.txt"
    path.write_text("".join(f"{tok} {name}\n" for name, tok in tokens.items()))
    s, d = run(lambda t: A.Accounts(t, list(tokens)), "paper", test_images, target=backend.target,
               args=("--auth-tokens", str(path)), tokens=tokens)
    assert d["images"] == 12 and d["forwards"] == 3  # one anchor per principal


@pytest.mark.integration
def test_local_sidecars_start_fresh(backend, test_images):
    img = test_images[7]
    for _ in range(2):
        with A.LocalSidecar(backend.target, "hardened", args=EXACT) as sc:
            t = A.GrpcTransport(sc.address, "tiny")
            try:
                t.batch("a", img[None])
                t.batch("b", img[None])
            finally:
                t.close()
            c = sc.counters("tiny")
            assert c["forwards"] == 1 and c["cache_lookup"] == 1  # nothing left over from the last one
