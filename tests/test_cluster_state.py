"""Security state shared by every gateway replica (issue 10): two real Envoys load the built
filter with `state.backend: cluster` and share one real Redis behind a real webdis, started here
on free loopback ports. Requirement IDs: ATK-1 (replay across replicas and restarts), PERM-5
(grant uses exact across replicas), PERM-4 / MON-6 (bans on every replica), and fail closed
(a store that cannot answer means 503 state_unavailable, never accepted unchecked)."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

import gateway as gw
import state_store
from conftest import base_policy, read_audit, start_gateway
from helpers import CREDENTIALS_VAR, PUBLIC, Pair, store_opened, upstream_count

pytestmark = pytest.mark.cluster

@pytest.fixture
def pair(tmp_path, secret):
    made = []

    def make(policy: dict | None = None, timeout_ms: int = 500, credentials: str | None = None,
             env: dict | None = None, app_share: int | None = None) -> Pair:
        p = Pair(tmp_path, secret, policy, timeout_ms, credentials, env, app_share)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def gauge(g, key: str, want: float, timeout: float = 30.0) -> float:
    """A gauge of the replica's Prometheus output once it reads `want` (one worker per replica
    reads the store for the gauges every 10 s), or what it read last."""
    from conftest import prometheus_series

    deadline = time.time() + timeout
    while True:
        got = prometheus_series(g.admin("/stats/prometheus")).get(key)
        if got == want or time.time() > deadline:
            return got
        time.sleep(1)


def quiet(g, stat: str, timeout: float = 10.0) -> int:
    """A counter once it has not moved for 1.2 s: the replica's own callouts at start (each
    filter configuration opens the store on its first tick, a second after it is made) are
    over before a test counts a request's trips."""
    deadline = time.time() + timeout
    last = g.stat(stat)
    while time.time() < deadline:
        time.sleep(1.2)
        now = g.stat(stat)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{stat} still moving after {timeout} s")


def refused_unsent(g, resp, status: int, code: str, before: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == code
    rec = read_audit(g, resp.json()["request_id"])
    assert rec["audit"]["code"] == code
    assert upstream_count(g) == before, "the upstream received the refused request"
    return rec


def test_replay_to_the_other_replica_is_refused(pair):  # ATK-1
    p = pair()
    signed = p.sign()
    assert p.send(p.a, signed).status_code == 200
    before = upstream_count(p.b)
    resp = p.send(p.b, signed)
    refused_unsent(p.b, resp, 401, "nonce_replayed", before)
    # and the other way round, with a fresh request first accepted by B
    signed = p.sign()
    assert p.send(p.b, signed).status_code == 200
    assert p.send(p.a, signed).json()["error"] == "nonce_replayed"


def test_parallel_copies_across_replicas_accept_exactly_one(pair):  # ATK-1
    p = pair()
    for _ in range(3):
        signed = p.sign()
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            codes = list(ex.map(lambda i: p.send(p.a if i % 2 else p.b, signed).status_code, range(20)))
        assert codes.count(200) == 1, codes
        assert codes.count(401) == 19, codes


def test_once_grant_used_on_one_replica_is_spent_on_the_other(pair):  # PERM-5
    doc = base_policy()
    for g in doc["grants"]:
        if g["id"] == "demo-partner-info":
            g["once"] = True
    p = pair(doc)
    assert p.send(p.a, p.sign()).status_code == 200
    before = upstream_count(p.b)
    refused_unsent(p.b, p.send(p.b, p.sign()), 403, "grant_exhausted", before)


def test_max_uses_is_exact_across_replicas_under_concurrency(pair):  # PERM-5
    doc = base_policy()
    for g in doc["grants"]:
        if g["id"] == "demo-partner-info":
            g["max_uses"] = 5
    p = pair(doc)
    signed = [p.sign() for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        answers = list(ex.map(lambda i: p.send(p.a if i % 2 else p.b, signed[i]), range(24)))
    codes = [r.status_code for r in answers]
    why = [r.text[:200] for r in answers if r.status_code != 200]
    assert codes.count(200) == 5, (codes, why)
    assert codes.count(403) == 19, (codes, why)


def test_ban_started_on_one_replica_refuses_on_the_other(pair):  # PERM-4, MON-6
    doc = base_policy()
    doc["bans"] = {"threshold": 3, "window_seconds": 60, "ban_seconds": 600}
    p = pair(doc)
    source = "127.0.0.7"
    bad = p.sign()
    bad_headers = dict(bad["headers"])
    bad_headers["signature"] = "sig1=:" + "A" * 86 + "==:"
    bad["headers"] = bad_headers
    for _ in range(3):
        r = p.send(p.a, {**bad, "headers": bad_headers}, source=source)
        assert r.json()["error"] in ("signature_invalid", "signature_malformed"), r.text
    before = upstream_count(p.b)
    rec = refused_unsent(p.b, p.send(p.b, p.sign(), source=source), 403, "banned", before)
    assert "127.0.0.7" in rec["audit"]["detail"]
    # another source is not affected
    assert p.send(p.b, p.sign(), source="127.0.0.8").status_code == 200
    # the ban is in force on every replica, and each one's gauge reads it from the store (MON-4)
    for g in (p.a, p.b):
        assert gauge(g, 'apisec_bans_active{subject="ip"}', 1) == 1
        assert gauge(g, 'apisec_bans_active{subject="app"}', 0) == 0


def test_restart_of_both_replicas_keeps_the_nonce(pair):  # ATK-1
    p = pair()
    signed = p.sign()
    assert p.send(p.a, signed).status_code == 200
    p.restart()
    for g in (p.a, p.b):
        r = p.send(g, signed)
        assert r.status_code == 401 and r.json()["error"] == "nonce_replayed", r.text
    assert p.send(p.b, p.sign()).status_code == 200


def test_store_restart_keeps_nonces_and_lost_data_moves_the_epoch(pair):  # ATK-1
    p = pair()
    signed = p.sign()
    assert p.send(p.a, signed).status_code == 200
    # Redis restarted: the append-only file brings the nonce back
    p.store.stop_redis()
    p.store.start_redis()
    deadline = time.time() + 10
    while True:
        r = p.send(p.b, signed)
        if r.status_code != 503 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 401 and r.json()["error"] == "nonce_replayed", r.text
    # Redis lost everything (a new, empty store): the epoch moves on, and a request created
    # before it cannot be accepted again
    old = p.sign()
    assert p.send(p.a, old).status_code == 200
    time.sleep(1.1)
    assert p.store.redis_cli("FLUSHALL") == "OK"
    r = p.send(p.b, old)
    assert r.status_code == 401 and r.json()["error"] == "created_too_old", r.text
    time.sleep(1.1)
    assert p.send(p.b, p.sign()).status_code == 200


def test_a_gateway_opens_the_store_before_it_serves(tmp_path, secret):  # ATK-1
    """The configuration's first, empty batch creates the store's epoch (`horizon`) as the
    gateway starts, before any request: otherwise the first request's own batch does, and a
    request signed in the second before it is refused as older than the store. The native
    build waited a second for its first tick (one-off 401 created_too_old in CI)."""
    store = state_store.StateStore(tmp_path / "store", gw.free_port(), gw.free_port()).start()
    g = None
    try:
        g = start_gateway(tmp_path / "g", state_store.with_cluster_state(base_policy()), secret=secret,
                          concurrency=1, state_port=store.http_port)
        # within half a second of being ready: a tick would come only after a whole second
        assert store_opened(store, 0.5) >= int(time.time()) - 3
    finally:
        if g is not None:
            g.stop()
        store.stop()


def test_store_down_refuses_503_then_recovers_without_restarting_envoy(pair):  # ATK-1, MON-11, fail closed
    p = pair(timeout_ms=300)
    r = p.send(p.a, p.sign())
    assert r.status_code == 200, r.text
    # stopped: connection refused
    p.store.stop_redis()
    for g in (p.a, p.b):
        before = upstream_count(g)
        rec = refused_unsent(g, p.send(g, p.sign()), 503, "state_unavailable", before)
        assert "state store" in rec["audit"]["detail"]
    # S0 asks the store nothing when no bans are configured: still served
    r = p.client(p.a).get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"})
    assert r.status_code == 200, r.text
    p.store.start_redis()
    deadline = time.time() + 10
    while p.send(p.b, p.sign()).status_code != 200:
        assert time.time() < deadline, "service did not resume after the store came back"
        time.sleep(0.2)
    # frozen: no answer within the timeout
    p.store.freeze()
    try:
        before = upstream_count(p.a)
        t0 = time.time()
        rec = refused_unsent(p.a, p.send(p.a, p.sign()), 503, "state_unavailable", before)
        assert time.time() - t0 < 3
        assert "504" in rec["audit"]["detail"] or "nothing" in rec["audit"]["detail"], rec["audit"]["detail"]
    finally:
        p.store.thaw()
    assert p.send(p.a, p.sign()).status_code == 200


def test_s0_with_bans_asks_the_store_and_fails_closed(pair):  # PERM-4, MON-6
    doc = base_policy()
    doc["bans"] = {"threshold": 3, "window_seconds": 60, "ban_seconds": 600}
    p = pair(doc)
    c = p.client(p.a)
    quote = "/api/v1/market/quotes/600000"
    assert c.get(quote, headers={"x-app-id": "demo-partner"}).status_code == 200
    p.store.stop_redis()
    before = upstream_count(p.a)
    refused_unsent(p.a, c.get(quote, headers={"x-app-id": "demo-partner"}), 503, "state_unavailable", before)


def test_signed_body_on_the_cluster_backend(pair):  # ATK-1, DATA-3
    p = pair()
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    signed = p.sign("/api/v1/orders", body=body, method="POST")
    r = p.send(p.a, signed)
    assert r.status_code == 200, r.text
    r = p.send(p.b, signed)
    assert r.status_code == 401 and r.json()["error"] == "nonce_replayed", r.text
    # a body that arrives after the store answered the early read (the request waits for it)
    signed = p.sign("/api/v1/orders", body=body, method="POST")
    c = p.client(p.b)
    headers = list(signed["headers"].items()) + [("host", PUBLIC)]
    conn = c.start("POST", f"https://127.0.0.1:{p.b.layout.https_port}/api/v1/orders", headers, body_len=len(body))
    time.sleep(0.5)
    conn.send(body)
    assert c.response(conn).status_code == 200
    assert p.send(p.a, signed).json()["error"] == "nonce_replayed"


def test_a_signed_body_makes_one_trip_to_the_store_and_a_bad_one_spends_its_nonce(pair):  # ATK-1, DATA-3
    p = pair()
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    assert p.send(p.a, p.sign("/api/v1/orders", body=body, method="POST")).status_code == 200  # warm
    callouts = "cluster.apisec_state.upstream_rq_total"
    before = quiet(p.a, callouts)
    for _ in range(5):
        r = p.send(p.a, p.sign("/api/v1/orders", body=body, method="POST"))
        assert r.status_code == 200, r.text
    made = p.a.stat(callouts) - before
    # one callout per request (two before issue 24); at most one of the replica's gauge reads
    # (one every 10 s) may fall in the window
    assert 5 <= made <= 6, f"{made} callouts for 5 signed requests with a body"
    # A body that fails its digest is refused, unsent, and has spent its nonce: the same signed
    # headers with the right body are then a replay, on either replica.
    signed = p.sign("/api/v1/orders", body=body, method="POST")
    tampered = {**signed, "body": body.replace(b"100", b"900")}
    refused_unsent(p.a, p.send(p.a, tampered), 401, "digest_mismatch", upstream_count(p.a))
    refused_unsent(p.b, p.send(p.b, signed), 401, "nonce_replayed", upstream_count(p.b))


def test_store_credentials(pair, tmp_path):  # fail closed without the right credentials
    p = pair(credentials="apisec-gw:s3cret-for-test", env={CREDENTIALS_VAR: "apisec-gw:s3cret-for-test"})
    signed = p.sign()
    assert p.send(p.a, signed).status_code == 200
    assert p.send(p.b, signed).json()["error"] == "nonce_replayed"
    # a gateway with the wrong password: webdis answers 403, the request is refused, unsent
    wrong = start_gateway(tmp_path / "wrong", p.policy, secret=p.secret, concurrency=1,
                          state_port=p.store.http_port, certs=p.certs,
                          env={CREDENTIALS_VAR: "apisec-gw:not-the-password"})
    try:
        before = upstream_count(wrong)
        rec = refused_unsent(wrong, p.send(wrong, p.sign()), 503, "state_unavailable", before)
        assert "403" in rec["audit"]["detail"]
    finally:
        wrong.stop()
    # a policy naming a variable Envoy does not have is refused, and the last good one stays
    import json

    missing = json.loads(json.dumps(p.policy))
    missing["state"]["cluster"]["credentials_env"] = "APISEC_NOT_SET_ANYWHERE"
    with pytest.raises(gw.PolicyRejected):
        gw.apply_policy(json.dumps(missing), p.a.layout, actor="test", source="test")
    assert p.send(p.a, p.sign()).status_code == 200


def test_tls_to_the_store(pair, tmp_path):  # DATA-2 on the hop to the store
    """The gateways reach webdis through TLS (an Envoy terminating it on the store's side) and
    check the store's certificate: a store that cannot prove to be the store is unavailable."""
    import subprocess

    import certs as certs_mod

    p = pair()
    tls_port = gw.free_port()
    boot = state_store.tls_terminator(tmp_path / "terminator", tls_port, p.store.http_port, p.certs, gw.free_port())
    term = subprocess.Popen([gw.envoy_binary(), "-c", str(boot), "--base-id", str(tls_port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other_ca = tmp_path / "other-ca"
    certs_mod.generate(other_ca)
    gws = []
    try:
        state_store.wait_port(tls_port, term, "tls terminator")
        good = start_gateway(tmp_path / "tls-good", p.policy, secret=p.secret, concurrency=1, state_port=tls_port,
                             certs=p.certs, state_tls_ca=p.certs / "ca.pem")
        gws.append(good)
        # checks the store against another CA: the handshake fails, nothing is accepted unchecked
        bad = start_gateway(tmp_path / "tls-bad", p.policy, secret=p.secret, concurrency=1, state_port=tls_port,
                            certs=p.certs, state_tls_ca=other_ca / "ca.pem")
        gws.append(bad)
        signed = p.sign()
        assert p.send(good, signed).status_code == 200
        # the same store as the plain-HTTP replicas: the replay is refused there
        assert p.send(p.a, signed).json()["error"] == "nonce_replayed"
        before = upstream_count(bad)
        refused_unsent(bad, p.send(bad, p.sign()), 503, "state_unavailable", before)
        assert good.stat("cluster.apisec_state.ssl.handshake") >= 1
    finally:
        for g in gws:
            g.stop()
        state_store.stop(term)


def test_one_partner_cannot_fill_the_shared_store(pair):  # ATK-1, MON-5 (issue 8 hole 4, cluster form)
    doc = base_policy()
    doc["apps"].append({"id": "other-partner", "credentials": [
        {"id": "other-partner-hmac", "alg": "hmac-sha256", "secret_env": "APISEC_DEMO_PARTNER_SECRET"}]})
    doc["grants"].append({"id": "other-partner-info", "app": "other-partner", "apis": ["info.research"]})
    p = pair(doc, app_share=3)
    first = p.sign()
    assert p.send(p.a, first).status_code == 200
    for g in (p.b, p.a):
        assert p.send(g, p.sign()).status_code == 200
    before = upstream_count(p.b)
    rec = refused_unsent(p.b, p.send(p.b, p.sign()), 503, "replay_store_full", before)
    assert "demo-partner holds its share (3)" in rec["audit"]["detail"]
    # a replay of an accepted request is still a replay, not "full"
    assert p.send(p.b, first).json()["error"] == "nonce_replayed"
    # every other partner is served
    other = p.sign(app="other-partner", keyid="other-partner-hmac")
    assert p.send(p.a, other).status_code == 200
    assert p.send(p.b, other).json()["error"] == "nonce_replayed"
    # the gauges read the shares from the store, on both replicas: 4 nonces held, the fullest
    # share (demo-partner's) full, capacity the shares of every app
    apps = len(doc["apps"])
    for g in (p.a, p.b):
        assert gauge(g, "apisec_replay_store_live{}", 4) == 4
        assert gauge(g, "apisec_replay_slot_fullest_ratio_pct{}", 100) == 100
        assert gauge(g, "apisec_replay_store_capacity{}", 3 * apps) == 3 * apps
