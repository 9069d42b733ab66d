"""Hardened mode: several anchors per session, memory across sessions, identity
from authenticated principals."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from sidecar.api import classifier_pb2_grpc as pb_grpc
import asyncio

from sidecar.state.crosssession import DEFAULT_BUDGET, CrossSessionIndex, NearDuplicateBudget
from sidecar.judge.judgment import HARDENED_TAU, Anchor, Fingerprint, Thresholds, fingerprints, plan, resolve
from sidecar.judge.lowpass import pixel_bound
from real_sidecar import BackendCounter, channel, classify_req, perturb, start_sidecar
from fake_sidecar import snapshot

TH = Thresholds()


def fps(*imgs):
    return [Fingerprint.of(x) for x in imgs]


def test_multi_anchor_hit_survives_interleaving(test_images):
    a, b = test_images[40], test_images[41]
    seq = fps(a, perturb(a, 1), b, perturb(a, 3), perturb(b, 2))
    paper = plan([], seq, TH, history=1)
    hard = plan([], seq, TH, history=8)
    assert [s.forward for s in paper.steps] == [True, False, True, True, True]  # the bypass
    assert [s.forward for s in hard.steps] == [True, False, True, False, False]
    answers, anchors = resolve(hard, ["A", "B"])
    assert answers == ["A", "A", "B", "A", "B"] and [x.result for x in anchors] == ["A", "B"]


def test_history_is_bounded(test_images):
    imgs = [test_images[i] for i in range(50, 55)]
    p = plan([], fps(*imgs), TH, history=3)
    assert len(p.anchors) == 3
    late = plan(resolve(p, list("abcde"))[1], fps(perturb(imgs[0], 1)), TH, history=3)
    assert late.steps[0].forward  # the oldest anchor fell out of the window


HARD = Thresholds(lowpass_tau=HARDENED_TAU)


def hfps(*imgs):
    return fingerprints(imgs, with_lowpass=True)


class Deployment:
    """The data plane's hardened judgment without I/O: per-session anchors, the
    cross-session index, and a model given as a function of the image."""

    def __init__(self, model, **index_kw) -> None:
        self.model = model
        self.index = CrossSessionIndex(**{"window": 1000, "ttl_s": 0, **index_kw})
        self.anchors: dict[str, tuple] = {}
        self.forwards = 0

    def ask(self, session: str, image: np.ndarray):
        """The answer, or the string "refused" (RESOURCE_EXHAUSTED)."""
        fp = hfps(image)
        try:
            p = plan(self.anchors.get(session, ()), fp, HARD, history=8, lookup=self.index.lookup("m"))
        except NearDuplicateBudget:
            return "refused"
        results = [self.model(f.image) for f in p.forwarded]
        if p.forwarded:
            loop = asyncio.new_event_loop()
            try:
                futures = loop.run_until_complete(self._reserve(p.forwarded))
            finally:
                loop.close()
            self.index.complete("m", p.forwarded, futures, results)
            self.forwards += len(results)
        answers, self.anchors[session] = resolve(p, results)
        return answers[0]

    async def _reserve(self, fps):
        return self.index.reserve("m", fps)


def test_hardened_thresholds_also_hold_across_interleaving(test_images):
    a, b = test_images[40], test_images[41]
    seq = hfps(a, perturb(a, 1), b, perturb(a, 3), perturb(b, 2))
    hard = plan([], seq, HARD, history=8)
    assert [s.forward for s in hard.steps] == [True, False, True, False, False]
    assert hard.steps[1].comparison.lowpass <= pixel_bound(1)


def test_exact_bytes_are_answered_across_sessions_with_the_models_own_answer(test_images):
    dep = Deployment(lambda img: ("label-of", img.tobytes()))
    a = test_images[60]
    first = dep.ask("one", a)
    assert [dep.ask(f"fresh-{k}", a.copy()) for k in range(5)] == [first] * 5
    assert dep.forwards == 1


def test_near_duplicates_get_their_own_answers_until_the_budget_then_refusal(test_images):
    budget = 3
    dep = Deployment(lambda img: img.tobytes(), budget=budget)
    a = test_images[61]
    dep.ask("origin", a)
    got = [dep.ask(f"fresh-{k}", perturb(a, 1, k)) for k in range(10)]
    forwarded = [g for g in got if g != "refused"]
    assert len(forwarded) == budget - 1  # the origin is the first of the neighbourhood
    assert all(g == perturb(a, 1, k).tobytes() for k, g in enumerate(got[:budget - 1]))  # own answers
    assert got[budget - 1:] == ["refused"] * (10 - budget + 1)
    assert dep.index.refusals == 10 - budget + 1
    assert dep.ask("origin", perturb(a, 1, 99)) == a.tobytes()  # own anchors still answer their principal


def test_refusal_changes_no_state(test_images):
    dep = Deployment(lambda img: 1, budget=1)
    a = test_images[62]
    dep.ask("origin", a)
    n = len(dep.index)
    assert dep.ask("other", perturb(a, 2)) == "refused"
    assert len(dep.index) == n and "other" not in dep.anchors


def test_poisoning_never_reaches_a_victim(test_images):
    """The attacker sends an adversarial near-duplicate of a popular image first;
    victims send the exact image, or their own near-duplicates, in their own
    sessions. No victim is ever told the attacker's label."""
    popular = test_images[64]
    adversarial = perturb(popular, 5, 1)
    dep = Deployment(lambda img: "WRONG" if np.array_equal(img, adversarial) else "right")
    assert dep.ask("attacker", adversarial) == "WRONG"
    told = [dep.ask(f"victim-{k}", popular) for k in range(6)]
    told += [dep.ask(f"victim-nd-{k}", perturb(popular, 1, 50 + k)) for k in range(6)]
    assert "WRONG" not in told
    assert told[:6] == ["right"] * 6  # the exact image: its own answer, forwarded once
    assert set(told) <= {"right", "refused"}


def test_rotation_one_pixel_copies_in_fresh_sessions_rarely_reach_the_model(test_images):
    a = test_images[65]
    dep = Deployment(lambda img: 0)
    dep.ask("origin", a)
    before = dep.forwards
    n = 100
    got = [dep.ask(f"rot-{k}", perturb(a, 1, k)) for k in range(n)]
    reached = (dep.forwards - before) / n
    print(f"rotation: {reached:.2%} of 1-pixel copies reached the model")
    assert reached <= 0.10
    assert got.count("refused") == n - (dep.forwards - before)


def far_masks(n: int, eps: int = 16) -> list[np.ndarray]:
    """Masks constant on 8x8-pixel blocks whose signs are rows of a Sylvester
    Hadamard matrix: pairwise low-pass distance 2*eps/255*sqrt(384) = 2.46 > tau at
    eps 16, the most an attacker can spread many masks (see crosssession.py), and
    apart at the coarse scales too (1.23 > 0.9 at 8x8, 0.61 > 0.3 at 4x4), so a
    session's own anchors do not catch them."""
    h = np.array([[1]])
    while len(h) < 64:
        h = np.block([[h, h], [h, -h]])
    rows = h[1:n + 1, :48].reshape(n, 4, 4, 3)
    return [np.kron(r, np.ones((8, 8, 1), int)) * eps for r in rows]


def test_a_batch_cannot_pass_a_budget_that_single_calls_cannot(test_images):
    a = test_images[66].astype(int)
    qs = [np.clip(a + m, 0, 255).astype(np.uint8) for m in far_masks(4)]
    idx = CrossSessionIndex(window=100, ttl_s=0, budget=3)
    with pytest.raises(NearDuplicateBudget):
        plan([], hfps(*qs), HARD, history=8, lookup=idx.lookup("m"))
    p = plan([], hfps(*qs[:3]), HARD, history=8, lookup=idx.lookup("m"))
    assert all(s.forward for s in p.steps)  # mutually farther than tau: own anchors do not catch them


def test_window_and_ttl_and_per_model(test_images):
    now = [0.0]
    idx = CrossSessionIndex(window=2, ttl_s=5, budget=1, clock=lambda: now[0])
    a, b, c = hfps(test_images[67], test_images[68], test_images[69])
    idx.add("m", [Anchor(a, "A"), Anchor(b, "B")])
    near_a = hfps(perturb(test_images[67], 2))[0]
    with pytest.raises(NearDuplicateBudget):
        idx.lookup("m")(near_a)
    assert idx.lookup("other")(near_a) is None  # per served model
    assert idx.lookup("m")(a).result == "A"  # exact bytes
    idx.add("m", [Anchor(c, "C")])  # window of 2: a falls out
    assert idx.lookup("m")(near_a) is None and idx.lookup("m")(a) is None
    assert len(idx) == 2
    now[0] = 6.0  # TTL
    assert idx.lookup("m")(c) is None and len(idx) == 0


async def test_images_in_flight_count_and_answer_exact_repeats(test_images):
    idx = CrossSessionIndex(window=100, ttl_s=0, budget=2)
    a = hfps(test_images[70])
    futures = idx.reserve("m", a)
    assert idx.lookup("m")(a[0]).result is futures[0]  # an exact repeat waits for the answer in flight
    near = hfps(perturb(test_images[70], 1), perturb(test_images[70], 2, 1))
    assert idx.lookup("m")(near[0]) is None  # 1 neighbour (in flight) < budget 2
    idx.reserve("m", near[:1])
    with pytest.raises(NearDuplicateBudget):
        idx.lookup("m")(near[1])
    idx.abandon("m", futures, RuntimeError("backend down"))
    assert idx.lookup("m")(a[0]) is None  # a failed forward leaves nothing behind
    with pytest.raises(RuntimeError):
        await futures[0]


def test_ann_search_finds_what_the_exact_scan_finds(test_images):
    """hnswlib candidates over the 64-dim projection, verified on full vectors,
    against the exact numpy scan: the same refusals on real images."""
    fps_all = hfps(*test_images[:600])
    noisy = hfps(*[np.clip(x.astype(int) + np.random.default_rng(i).choice([-12, 12], x.shape), 0, 255).astype(np.uint8)
                   for i, x in enumerate(test_images[:300])])
    verdicts = []
    for exact_below in (10**9, 0):
        idx = CrossSessionIndex(window=1000, ttl_s=0, budget=1, exact_below=exact_below)
        idx.add("m", [Anchor(f, i) for i, f in enumerate(fps_all)])
        out = []
        for fp in noisy + hfps(*test_images[600:800]):
            try:
                out.append(idx.lookup("m")(fp) is None)
            except NearDuplicateBudget:
                out.append(False)
        verdicts.append(out)
    assert verdicts[0] == verdicts[1]
    assert not any(verdicts[0][:300])  # every masked copy of an indexed image is refused


@pytest.fixture
async def hardened(backend):  # noqa: F811
    server = await start_sidecar(backend.target, mode="hardened")
    yield server
    await server.stop(0)


async def test_cross_session_over_grpc_exact_answers_budget_and_refusal(hardened, test_images):
    a = test_images[70]
    counter = BackendCounter(hardened)
    async with channel(hardened) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        first = await stub.Classify(classify_req(a, session="one"))
        repeats = [await stub.Classify(classify_req(a, session=f"again-{k}")) for k in range(3)]
        assert counter.calls == 1 and all(r.result.scores == first.result.scores for r in repeats)
        refused = forwarded = 0
        for k in range(1, 8):
            try:
                await stub.Classify(classify_req(perturb(a, 1, k), session=f"fresh-{k}"))
                forwarded += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "near-duplicate" in exc.details()
                refused += 1
    assert forwarded == DEFAULT_BUDGET - 1 and counter.calls == DEFAULT_BUDGET
    reg = hardened.metrics.registry
    assert reg.get_sample_value("hashguard_cache_answers_total", {"model": "tiny", "mode": "hardened", "source": "lookup"}) == 3
    assert reg.get_sample_value("hashguard_near_duplicate_refusals_total", {"model": "tiny"}) == refused == 7 - forwarded


async def test_interleaving_bypasses_paper_but_not_hardened(backend, test_images):  # noqa: F811
    a, decoy = test_images[71], test_images[72]
    calls = {}
    for mode in ("paper", "hardened"):
        server = await start_sidecar(backend.target, mode=mode)
        try:
            counter = BackendCounter(server)
            async with channel(server) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                await stub.Classify(classify_req(a))
                for k in range(1, 4):
                    await stub.Classify(classify_req(decoy))
                    await stub.Classify(classify_req(perturb(a, k, k)))
            calls[mode] = counter.calls
        finally:
            await server.stop(0)
    assert calls["paper"] == 7  # every perturbed query reached the model
    assert calls["hardened"] == 2  # only a and the decoy, once each


@pytest.fixture
async def authed(backend, tmp_path):  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text("# token principal\nt-alice alice\nt-bob bob\n")
    server = await start_sidecar(backend.target, mode="paper", auth_tokens=str(tokens))
    yield server
    await server.stop(0)


async def test_principal_not_session_id_is_the_session(authed, test_images):
    a = test_images[73]
    counter = BackendCounter(authed)
    alice = [("authorization", "Bearer t-alice")]
    async with channel(authed) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        await stub.Classify(classify_req(a, session="chosen-1"), metadata=alice)
        await stub.Classify(classify_req(perturb(a, 2), session="chosen-2"), metadata=alice)
        assert counter.calls == 1  # a new client-chosen session id did not reset alice's anchor
        await stub.Classify(classify_req(perturb(a, 2), session="chosen-1"), metadata=[("authorization", "Bearer t-bob")])
        assert counter.calls == 2  # bob is another principal: his own anchor
    assert any(k.startswith("u:alice") for k in snapshot(authed))


async def test_bad_or_missing_token_is_unauthenticated_and_changes_nothing(authed, test_images):
    async with channel(authed) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        await stub.Classify(classify_req(test_images[74]), metadata=[("authorization", "Bearer t-alice")])
        before = snapshot(authed)
        for md in ([("authorization", "Bearer wrong")], [("authorization", "Basic dDp4")], []):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Classify(classify_req(test_images[75]), metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert snapshot(authed) == before


async def test_concurrent_fresh_sessions_wait_for_the_image_in_flight(backend, test_images):  # noqa: F811
    """Many fresh sessions at once with copies of one image while it is in flight:
    exact copies wait for its answer, near-duplicates count against the budget
    at once instead of racing past the index."""
    import asyncio

    server = await start_sidecar(backend.target, mode="hardened")
    try:
        counter = BackendCounter(server)
        original = server.plane.backend.predict

        in_flight = asyncio.Event()

        async def slow(key, batch):  # keep the first forward in flight a while
            in_flight.set()
            await asyncio.sleep(0.3)
            return await original(key, batch)

        server.plane.backend.predict = slow
        a = test_images[76]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = asyncio.ensure_future(stub.Classify(classify_req(a, session="first")))
            await asyncio.wait_for(in_flight.wait(), 10)
            same = await asyncio.gather(*(stub.Classify(classify_req(a, session=f"s{k}")) for k in range(6)))
            near = await asyncio.gather(*(stub.Classify(classify_req(perturb(a, k % 5 + 1, k), session=f"f{k}"))
                                          for k in range(12)), return_exceptions=True)
            head = await first
        assert all(r.result.scores == head.result.scores for r in same)  # exact repeats waited for the answer
        refused = [r for r in near if isinstance(r, grpc.aio.AioRpcError)]
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert counter.calls == 1 + len(near) - len(refused) == DEFAULT_BUDGET  # in flight counted at once
    finally:
        await server.stop(0)


async def test_waiters_fail_like_the_forward_and_keep_no_state(backend, test_images):  # noqa: F811
    import asyncio

    from sidecar.errors import BackendUnavailable

    server = await start_sidecar(backend.target, mode="hardened")
    try:
        in_flight = asyncio.Event()

        async def down(key, batch):
            in_flight.set()
            await asyncio.sleep(0.2)
            raise BackendUnavailable("model backend unavailable: test")

        server.plane.backend.predict = down
        a = test_images[77]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = asyncio.ensure_future(stub.Classify(classify_req(a, session="first")))
            await asyncio.wait_for(in_flight.wait(), 10)
            second = stub.Classify(classify_req(a, session="second"))
            for call in (first, second):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert snapshot(server) == {}
        assert len(server.plane.index) == 0
    finally:
        await server.stop(0)


def test_small_shifts_and_noise_are_similar_at_a_coarse_scale_distinct_images_are_not(test_images):
    """The OARS-style resampler re-asks a cached query shifted by 1 px, or shifted and
    noised; at 16x16 many such copies are farther than tau, but their 8x8/4x4 means are
    not, so a session's own anchor still answers them. Distinct test images are not
    caught by the coarse scales."""
    from sidecar.judge.judgment import compare
    from sidecar.judge.lowpass import distance

    rng = np.random.default_rng(3)
    caught = far_at_16 = 0
    for img in test_images[:60]:
        shifted = np.roll(img, 1, axis=1)
        noisy = np.clip(shifted.astype(float) + rng.normal(0, 16, img.shape), 0, 255).astype(np.uint8)
        a, s, n = hfps(img, shifted, noisy)
        for q in (s, n):
            far_at_16 += float(distance(a.lowpass, q.lowpass)) > HARDENED_TAU
            caught += compare(a, q, HARD).similar
    assert far_at_16 >= 10  # the case the coarse scales exist for does occur
    assert caught >= 0.9 * 120
    fps = hfps(*test_images[:200])
    similar_pairs = sum(compare(fps[i], fps[j], HARD).similar for i in range(200) for j in range(i + 1, 200))
    assert similar_pairs <= 2
