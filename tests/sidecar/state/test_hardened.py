"""Hardened mode: several anchors per session, memory across sessions, identity
from authenticated principals."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from sidecar.api import classifier_pb2_grpc as pb_grpc
import asyncio

from sidecar.state.crosssession import DEFAULT_BUDGET, CrossSessionIndex
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
    cross-session index (exact bytes, per-principal budgets), and a model given as a
    function of the image. ``principal`` defaults to the session (one principal per
    session); pass one principal for many sessions of one host."""

    def __init__(self, model, **index_kw) -> None:
        self.model = model
        self.index = CrossSessionIndex(**{"window": 1000, "ttl_s": 0, **index_kw})
        self.anchors: dict[str, tuple] = {}
        self.forwards = 0

    def ask(self, session: str, image: np.ndarray, principal: str | None = None):
        principal = session if principal is None else principal
        fp = fingerprints([image], with_lowpass=True, with_invariant=True)
        p = plan(self.anchors.get(session, ()), fp, HARD, history=8, lookup=self.index.lookup("m", principal))
        results = [self.model(f.image) for f in p.forwarded]
        if p.forwarded:
            loop = asyncio.new_event_loop()
            try:
                futures = loop.run_until_complete(self._reserve(p.forwarded, principal))
            finally:
                loop.close()
            self.index.complete("m", p.forwarded, futures, results)
            self.forwards += len(results)
        answers, self.anchors[session] = resolve(p, results)
        return answers[0]

    async def _reserve(self, fps, principal):
        return self.index.reserve("m", fps, principal)


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


def test_a_principals_near_duplicates_get_real_answers_until_its_budget_then_its_own_nearest(test_images):
    """Fresh sessions of one principal: ``budget`` real answers for the neighbourhood,
    then the principal's own nearest earlier answer. Nothing is refused."""
    budget = 3
    dep = Deployment(lambda img: img.tobytes(), budget=budget)
    a = test_images[61]
    dep.ask("origin", a, principal="host")
    got = [dep.ask(f"fresh-{k}", perturb(a, 1, k), principal="host") for k in range(10)]
    assert dep.forwards == budget  # the origin is the first of the neighbourhood
    assert all(g == perturb(a, 1, k).tobytes() for k, g in enumerate(got[:budget - 1]))  # own answers
    own = {a.tobytes()} | {perturb(a, 1, k).tobytes() for k in range(budget - 1)}
    assert set(got[budget - 1:]) <= own  # the principal's own earlier answers, never a refusal
    assert dep.index.budget_answers == 10 - budget + 1


def test_another_principal_is_answered_for_its_own_image_whatever_the_first_sent(test_images):
    """Denial (issue 23): an attacker spends many near-duplicates of an image, each in a
    fresh session; a victim (another principal) sending the exact image, or its own
    near-duplicate, gets the model's answer for its own bytes."""
    dep = Deployment(lambda img: img.tobytes(), budget=2)
    a = test_images[62]
    rng = np.random.default_rng(0)
    for k in range(30):
        noisy = np.clip(a.astype(int) + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
        dep.ask(f"att-{k}", noisy, principal="attacker")
    for v in range(5):
        assert dep.ask(f"victim-{v}", a, principal=f"victim-{v}") == a.tobytes()
        mine = perturb(a, 2, 100 + v)
        assert dep.ask(f"victim-nd-{v}", mine, principal=f"victim-nd-{v}") == mine.tobytes()


def test_poisoning_never_reaches_a_victim(test_images):
    """The attacker sends an adversarial near-duplicate of a popular image first;
    victims send the exact image, or their own near-duplicates, in their own
    sessions. No victim is ever told the attacker's label."""
    popular = test_images[64]
    adversarial = perturb(popular, 5, 1)
    dep = Deployment(lambda img: "WRONG" if np.array_equal(img, adversarial) else "right")
    assert dep.ask("attacker", adversarial) == "WRONG"
    for k in range(10):  # the attacker spends its own budget too
        dep.ask(f"attacker-{k}", perturb(adversarial, 1, k), principal="attacker")
    told = [dep.ask(f"victim-{k}", popular) for k in range(6)]
    told += [dep.ask(f"victim-nd-{k}", perturb(popular, 1, 50 + k)) for k in range(6)]
    assert told == ["right"] * 12


def test_rotation_one_pixel_copies_in_fresh_sessions_rarely_reach_the_model(test_images):
    a = test_images[65]
    dep = Deployment(lambda img: 0)
    dep.ask("origin", a, principal="host")
    before = dep.forwards
    n = 100
    got = [dep.ask(f"rot-{k}", perturb(a, 1, k), principal="host") for k in range(n)]
    reached = (dep.forwards - before) / n
    print(f"rotation: {reached:.2%} of 1-pixel copies reached the model")
    assert reached <= 0.10
    assert got == [0] * n  # every one answered


def smooth_field_copies(img: np.ndarray, n: int, eps: float = 32, seed: int = 0) -> list[np.ndarray]:
    """Issue 23's low-frequency blinding: a fresh smooth colour field (DCT u, v <= 3 per
    channel, L-inf ``eps``) on a fresh 1-pixel copy per query."""
    rng = np.random.default_rng(seed)
    i = np.arange(32)
    rows = [np.cos(np.pi * (2 * i + 1) * u / 64) for u in range(4)]
    basis = np.array([np.outer(rows[u], rows[v]) for u in range(4) for v in range(4) if u or v])
    out = []
    for k in range(n):
        f = np.einsum("cb,bhw->hwc", rng.standard_normal((3, len(basis))), basis)
        f *= eps / np.abs(f).max()
        out.append(np.clip(np.rint(perturb(img, 1, k).astype(float) + f), 0, 255).astype(np.uint8))
    return out


def test_smooth_field_blinding_is_held_by_the_budget(test_images):
    """The blinding that walked through v2 (598/600 forwarded) stays within the
    principal's budget: at most 5% of blinded 1-pixel queries reach the model."""
    reached = []
    for j in range(5):
        a = test_images[100 + j]
        dep = Deployment(lambda img: 0)
        dep.ask("origin", a, principal="host")
        before = dep.forwards
        for k, q in enumerate(smooth_field_copies(a, 60, seed=j)):
            dep.ask(f"s-{k}", q, principal="host")
        reached.append(dep.forwards - before)
    assert sum(reached) / 300 <= 0.05, reached


def test_a_batch_cannot_pass_a_budget_that_single_calls_cannot(test_images):
    """What a plan decided to forward counts for the later queries of the same batch
    (``note``), and answers them once the budget is spent."""
    from sidecar.judge.judgment import Pending

    qs = fingerprints(smooth_field_copies(test_images[66], 6, seed=3), with_lowpass=True, with_invariant=True)
    idx = CrossSessionIndex(window=100, ttl_s=0, budget=2)
    find = idx.lookup("m", "host")
    got = []
    for k, q in enumerate(qs):
        hit = find(q)
        if hit is None:
            anchor = Anchor(q, Pending(k))
            find.note(anchor)
            got.append("forward")
        else:
            got.append(hit.result)
    assert got[:2] == ["forward", "forward"]
    assert all(isinstance(g, Pending) and g.index in (0, 1) for g in got[2:])


def test_window_and_ttl_and_per_model_and_per_principal(test_images):
    now = [0.0]
    idx = CrossSessionIndex(window=2, ttl_s=5, budget=1, clock=lambda: now[0], history=2)
    a, b, c = fingerprints([test_images[67], test_images[68], test_images[69]], with_lowpass=True,
                           with_invariant=True)
    idx.add("m", [Anchor(a, "A"), Anchor(b, "B")], "host")
    near_a = fingerprints([perturb(test_images[67], 2)], with_lowpass=True, with_invariant=True)[0]
    assert idx.lookup("m", "host")(near_a).result == "A"  # over the budget: the own nearest answer
    assert idx.lookup("m", "someone-else")(near_a) is None  # per principal
    assert idx.lookup("other", "host")(near_a) is None  # per served model
    assert idx.lookup("m", "someone-else")(a).result == "A"  # exact bytes: shared
    idx.add("m", [Anchor(c, "C")], "host")  # window and history of 2: a falls out
    assert idx.lookup("m", "host")(near_a) is None and idx.lookup("m", "host")(a) is None
    assert len(idx) == 2
    now[0] = 6.0  # TTL
    assert idx.lookup("m", "host")(c) is None and len(idx) == 0


def test_least_recently_used_principals_are_forgotten_first(test_images):
    idx = CrossSessionIndex(window=100, ttl_s=0, budget=1, max_principals=2)
    a = fingerprints([test_images[71]], with_lowpass=True, with_invariant=True)[0]
    near = fingerprints([perturb(test_images[71], 2)], with_lowpass=True, with_invariant=True)[0]
    for p in ("p1", "p2"):
        idx.add("m", [Anchor(a, p)], p)
    assert idx.lookup("m", "p1")(near).result == "p1"  # p1 used last: p2 is the oldest
    idx.add("m", [Anchor(a, "p3")], "p3")
    assert idx.lookup("m", "p1")(near).result == "p1"
    assert idx.lookup("m", "p2")(near) is None  # forgotten


async def test_images_in_flight_count_and_answer_exact_repeats(test_images):
    idx = CrossSessionIndex(window=100, ttl_s=0, budget=2)
    a = fingerprints([test_images[70]], with_lowpass=True, with_invariant=True)
    futures = idx.reserve("m", a, "host")
    assert idx.lookup("m", "x")(a[0]).result is futures[0]  # an exact repeat waits for the answer in flight
    near = fingerprints([perturb(test_images[70], 1), perturb(test_images[70], 2, 1)], with_lowpass=True,
                        with_invariant=True)
    assert idx.lookup("m", "host")(near[0]) is None  # 1 neighbour (in flight) < budget 2
    more = idx.reserve("m", near[:1], "host")
    assert idx.lookup("m", "host")(near[1]).result in (futures[0], more[0])  # waits for its own nearest
    idx.abandon("m", futures, RuntimeError("backend down"))
    idx.abandon("m", more, RuntimeError("backend down"))
    assert idx.lookup("m", "x")(a[0]) is None  # a failed forward leaves nothing behind
    assert idx.lookup("m", "host")(near[1]) is None
    with pytest.raises(RuntimeError):
        await futures[0]


@pytest.fixture
async def hardened(backend):  # noqa: F811
    server = await start_sidecar(backend.target, mode="hardened")
    yield server
    await server.stop(0)


async def test_cross_session_over_grpc_exact_answers_and_budget_without_refusal(hardened, test_images):
    """Over gRPC every session of the test host is one principal (its address)."""
    a = test_images[70]
    counter = BackendCounter(hardened)
    async with channel(hardened) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        first = await stub.Classify(classify_req(a, session="one"))
        repeats = [await stub.Classify(classify_req(a, session=f"again-{k}")) for k in range(3)]
        assert counter.calls == 1 and all(r.result.scores == first.result.scores for r in repeats)
        for k in range(1, 8):  # never an error
            await stub.Classify(classify_req(perturb(a, 1, k), session=f"fresh-{k}"))
    assert counter.calls == DEFAULT_BUDGET
    reg = hardened.metrics.registry
    assert reg.get_sample_value("hashguard_cache_answers_total",
                                {"model": "tiny", "mode": "hardened", "source": "lookup"}) == 3 + 8 - DEFAULT_BUDGET
    assert reg.get_sample_value("hashguard_near_duplicate_budget_answers_total", {"model": "tiny"}) == 8 - DEFAULT_BUDGET


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
    exact copies wait for its answer, near-duplicates count against the host's budget
    at once instead of racing past the index, and are answered, not refused."""
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
        assert not any(isinstance(r, BaseException) for r in near)  # nothing refused
        assert counter.calls == DEFAULT_BUDGET  # in flight counted at once
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


async def test_with_auth_an_attackers_near_duplicates_change_nothing_for_another_principal(backend, test_images,  # noqa: F811
                                                                                             tmp_path):
    """Issue 23's denial over gRPC with --auth-tokens: an attacker account spends many
    noisy near-duplicates of an image (each in a fresh session id, ignored with auth);
    the victim account then gets the model's own answer for its exact image and for its
    own near-duplicate, with no error."""
    tokens = tmp_path / "tokens"
    tokens.write_text("t-mallory mallory\nt-victim victim\n")
    server = await start_sidecar(backend.target, mode="hardened", auth_tokens=str(tokens))
    try:
        a = test_images[80]
        rng = np.random.default_rng(0)
        mallory, victim = [("authorization", "Bearer t-mallory")], [("authorization", "Bearer t-victim")]
        async with channel(server) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for k in range(12):
                noisy = np.clip(a.astype(int) + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
                await stub.Classify(classify_req(noisy, session=f"m{k}"), metadata=mallory)
            counter = BackendCounter(server)
            got = await stub.Classify(classify_req(a, session="v"), metadata=victim)
            mine = perturb(a, 2, 7)
            got_nd = await stub.Classify(classify_req(mine, session="v2"), metadata=victim)
        assert counter.calls == 1  # the exact image: the victim's own forward; its near-duplicate: its own anchor
        from sidecar.backend.base import ModelRef

        served = await server.plane.backend.resolve(ModelRef("tiny"))
        direct, _ = await server.plane.backend.predict(served.key, a[None])
        assert list(got.result.scores) == pytest.approx(list(direct[0]), abs=1e-6)  # the model's own answer
        assert got_nd.result.label == got.result.label
    finally:
        await server.stop(0)
