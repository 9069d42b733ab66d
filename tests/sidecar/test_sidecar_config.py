from __future__ import annotations

import pytest

from sidecar.config import Settings, from_args
from sidecar.plane.identity import Caller, IdentityPolicy, peer_host, session_for
from sidecar.errors import InvalidInput


def test_flags_and_defaults():
    s = from_args(["--backend", "tfs:8500", "--mode", "hardened", "--padding", "fixed", "--padding-target-ms", "20"])
    assert (s.backend, s.port, s.mode, s.padding, s.padding_target_ms) == ("tfs:8500", 8600, "hardened", "fixed", 20.0)
    assert s.threshold == pytest.approx(25.6)


def test_every_flag_has_an_environment_variable(monkeypatch):
    monkeypatch.setenv("HASHGUARD_BACKEND", "envhost:9000")
    monkeypatch.setenv("HASHGUARD_PORT", "9999")
    monkeypatch.setenv("HASHGUARD_REQUIRE_SESSION", "true")
    monkeypatch.setenv("HASHGUARD_THRESHOLD", "12.5")
    s = from_args([])
    assert (s.backend, s.port, s.require_session, s.threshold) == ("envhost:9000", 9999, True, 12.5)
    assert from_args(["--port", "1"]).port == 1  # flags beat the environment


def test_bad_settings_are_rejected():
    with pytest.raises(SystemExit):
        from_args(["--mode", "nonsense"])
    with pytest.raises(ValueError):
        Settings(history=0)


def test_session_identity_order_and_fallback():
    pol = IdentityPolicy()
    assert session_for(pol, Caller(None, "meta", "ipv4:1.2.3.4:5"), "field") == "s:field"
    assert session_for(pol, Caller(None, "meta", "ipv4:1.2.3.4:5")) == "s:meta"
    assert session_for(pol, Caller(None, "", "ipv4:1.2.3.4:5")) == "p:ipv4:1.2.3.4"
    assert session_for(pol, Caller("u:alice", "meta", "ipv4:1.2.3.4:5"), "field") == "u:alice"
    assert peer_host("ipv6:[::1]:5555") == "ipv6:[::1]"
    with pytest.raises(InvalidInput):
        session_for(IdentityPolicy(require=True), Caller(None, "", "ipv4:1.2.3.4:5"))
    with pytest.raises(InvalidInput):
        session_for(IdentityPolicy(max_len=4), Caller(None, "", ""), "toolong")


def test_session_store_setting():
    assert from_args(["--session-store", "redis://cache:6379/0"]).session_store == "redis://cache:6379/0"
    with pytest.raises(ValueError):
        Settings(session_store="memcached://x")


async def test_redis_store_is_built_from_the_url():
    from sidecar.metrics import Metrics
    from sidecar.state.redis_store import RedisSessionStore
    from sidecar.server import build_plane

    metrics = Metrics("paper")
    plane = build_plane(Settings(session_store="redis://127.0.0.1:6399/0", metrics_port=0), metrics)
    assert isinstance(plane.store, RedisSessionStore)
    assert plane.store._on_reset == metrics.store_resets.inc  # lost data is counted
    await plane.store.aclose()
    await plane.backend.close()


def test_every_flag_says_what_it_does_and_booleans_stand_alone():
    from dataclasses import fields

    assert [f.name for f in fields(Settings) if not f.metadata.get("help")] == []
    assert from_args(["--require-session"]).require_session is True
    assert from_args(["--require-session", "false"]).require_session is False


def test_cover_forwards_are_on_with_any_padding_and_can_be_turned_off():
    from sidecar.metrics import Metrics
    from sidecar.server import build_plane
    from sidecar.testing import FakeBackend

    def cover(**kw):
        return build_plane(Settings(metrics_port=0, **kw), Metrics("paper"), FakeBackend()).settings.cover

    assert Settings().cover_forwards and cover()
    assert cover(padding="fixed", padding_target_ms=5.0)
    assert not cover(padding="off")  # nothing to hide: answers leave when ready
    assert not cover(cover_forwards=False)
    assert from_args(["--cover-forwards", "false"]).cover_forwards is False
