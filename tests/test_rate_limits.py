"""Rate limits and quotas from the policy (issue 23; RL-1, RL-2, RL-4, OPS-4), on a real Envoy
with the `local` store and on two real Envoys sharing one real Redis (behind webdis) with the
`cluster` store, calls spread over both replicas.

Every refused case checks the status (429), the error code (`rate_limited`), `Retry-After`, the
audit record (with the rule and window) and that the upstream received nothing; every alert checks
that the call went on and that its record names the rule; `apisec_rate_limited_total` counts both.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from conftest import Client, base_policy, gw, read_audit, start_gateway
from helpers import QUOTE, Replicas, assert_refused, ecds_stats, metric, reload, session_policy, upstream_count, wait_for

APP = [("x-app-id", "demo-partner")]
TEST_APPS = ("demo-vendor", "demo-fund", "demo-broker", "demo-quota")


def policy() -> dict:
    doc = base_policy()
    for app in TEST_APPS:
        doc["apps"].append({"id": app, "name": f"test app {app}", "credentials": [
            {"id": f"{app}-hmac", "alg": "hmac-sha256", "secret_env": "APISEC_DEMO_PARTNER_SECRET"}]})
        doc["grants"].append({"id": f"{app}-info", "app": app, "functions": ["licensed_info"]})
    # bans after 3 refusals: only a rule that says so counts its refusals toward them (RL-4)
    doc["bans"] = {"threshold": 3, "window_seconds": 600, "ban_seconds": 600}
    doc["rate_limits"] = [
        # two windows on one rule: 50 a second, 3 a minute, per app and API
        {"id": "research-per-app", "by": ["app", "api"], "apis": ["info.research"],
         "apps": ["demo-partner", "demo-vendor"], "per_second": 50, "per_minute": 3},
        # the S0 quotes, per source address
        {"id": "quotes-per-source", "by": ["source"], "apis": ["market.quote"], "per_minute": 2},
        # an alert, not a refusal
        {"id": "fund-watch", "by": ["app"], "apps": ["demo-fund"], "per_minute": 1, "action": "alert"},
        # a caller that keeps hitting its limit is banned (RL-4)
        {"id": "broker-strict", "by": ["app"], "apps": ["demo-broker"], "per_minute": 1,
         "count_toward_ban": True},
        # per end user (the one the signature covers), over a business function
        {"id": "fund-user", "by": ["user"], "apps": ["demo-fund"], "functions": ["licensed_info"],
         "per_minute": 1},
        # a contract's daily quota
        {"id": "quota-daily", "by": ["app"], "apps": ["demo-quota"],
         "quota": {"per_day": 2, "timezone": "Asia/Shanghai"}},
    ]
    return doc


class Target(Replicas):
    def limited(self, **labels: str) -> float:
        return sum(metric(g, "apisec_rate_limited_total", **labels) for g in self.gateways)


@pytest.fixture(scope="module", params=["local", "cluster"])
def target(request, tmp_path_factory, secret):
    t = Target(request.param, tmp_path_factory.mktemp(f"rate-{request.param}"), secret, policy())
    yield t
    t.stop()


def allowed(t: Target, i: int, r) -> dict:
    assert r.status_code == 200, r.text
    rec = read_audit(t.g(i), r.json()["headers"]["x-request-id"])
    assert rec["upstream"] is not None and rec["audit"]["decision"] == "allow"
    return rec["audit"]


def limited(t: Target, i: int, r, rule: str, window: str) -> dict:
    """A call refused by a rate limit: 429, `rate_limited`, a Retry-After, the rule in the
    record, and nothing upstream."""
    before = t.upstream()
    audit = assert_refused(t.g(i), r, 429, "rate_limited")
    assert t.upstream() == before, "the upstream received the refused request"
    assert audit["rate_limits"] == [{"rule": rule, "window": window, "action": "refuse"}]
    retry = int(r.headers["retry-after"])
    assert retry >= 1
    return audit


def test_two_windows_on_one_rule_and_keys_apart(target):  # RL-1, RL-2
    t = target
    # 3 a minute per app and API, over both replicas; within 50 a second throughout
    for i in range(3):
        assert "rate_limits" not in allowed(t, i, t.call(i, "demo-partner"))
    r = t.call(3, "demo-partner")
    audit = limited(t, 3, r, "research-per-app", "minute")
    assert "per minute" in audit["detail"]
    assert int(r.headers["retry-after"]) <= 120
    # another app counts apart; a refused call counted nothing, and the refusals (this rule does
    # not count toward bans) never ban the partner: the next calls are still rate_limited
    assert t.call(4, "demo-vendor").status_code == 200
    for i in range(5, 8):
        limited(t, i, t.call(i, "demo-partner"), "research-per-app", "minute")
    assert t.limited(app="demo-partner", rule="research-per-app", action="refuse") == 4


def test_forged_identity_headers_move_no_bucket(target):  # RL-2, OPS-4
    t = target
    src, other = "127.0.0.61", "127.0.0.62"
    # S0: by source address, as Envoy saw it
    for i in range(2):
        assert t.quote(i, src).status_code == 200
    forged = [("x-forwarded-for", "203.0.113.9"), ("x-real-ip", "203.0.113.9"),
              ("x-apisec-app", "demo-vendor"), ("x-user-id", "u-forged"), ("forwarded", "for=203.0.113.9")]
    for i, h in enumerate(forged):
        r = t.quote(i, src, add=[h])
        limited(t, i, r, "quotes-per-source", "minute")
    # another claimed App_ID is no other bucket either
    limited(t, 0, t.quote(0, src, app="demo-vendor"), "quotes-per-source", "minute")
    assert t.quote(0, other).status_code == 200
    # S1: the app is the one that signed. Use up the vendor's minute, then send its call with
    # another app's name (one the rule does not select) in the gateway's own identity header:
    # still the vendor's bucket, still refused
    statuses = [t.call(i, "demo-vendor").status_code for i in range(4)]
    assert 200 in statuses and statuses[-1] == 429, statuses
    r = t.call(0, "demo-vendor", add=[("x-apisec-app", "demo-fund")])
    limited(t, 0, r, "research-per-app", "minute")


def test_an_alerting_rule_lets_the_call_on(target):  # RL-1, MON (rate-limit alert)
    t = target
    assert "rate_limits" not in allowed(t, 0, t.call(0, "demo-fund"))
    for i in (1, 2):
        audit = allowed(t, i, t.call(i, "demo-fund"))
        assert audit["rate_limits"] == [{"rule": "fund-watch", "window": "minute", "action": "alert"}]
    assert t.limited(app="demo-fund", rule="fund-watch", action="alert") == 2


def test_a_caller_that_keeps_hitting_its_limit_is_banned(target):  # RL-4, PERM-4
    t = target
    assert t.call(0, "demo-broker").status_code == 200
    for i in range(1, 4):
        limited(t, i, t.call(i, "demo-broker"), "broker-strict", "minute")
    # the third counted refusal started a ban: now banned, on every replica
    for i in range(4, 6):
        audit = assert_refused(t.g(i), t.call(i, "demo-broker"), 403, "banned")
        assert audit["app"] == "demo-broker"


def test_a_daily_quota(target):  # RL-1 (quotas)
    t = target
    for i in range(2):
        assert t.call(i, "demo-quota").status_code == 200
    r = t.call(2, "demo-quota")
    limited(t, 2, r, "quota-daily", "quota_day")
    # the wait is until midnight in Shanghai
    now = time.time()
    midnight = (int(now + 8 * 3600) // 86400 + 1) * 86400 - 8 * 3600
    assert abs(int(r.headers["retry-after"]) - (midnight - now)) <= 5


def test_a_limit_changed_by_policy_apply_takes_effect_and_is_logged(tmp_path, secret):  # RL-1, OPS-4, LOG-5
    doc = policy()
    g = start_gateway(tmp_path / "gw", doc, secret=secret)
    try:
        c = Client(g, secret)
        for _ in range(2):
            assert c.raw("GET", c.https + QUOTE, APP, source="127.0.0.71").status_code == 200
        r = c.raw("GET", c.https + QUOTE, APP, source="127.0.0.71")
        assert r.status_code == 429
        # `apisec policy apply`, as an operator would: no restart
        doc["rate_limits"][1]["per_minute"] = 5
        before = ecds_stats(g)["update_success"]
        record = gw.apply_policy(json.dumps(doc), g.layout, actor="alice", source="test")
        wait_for(lambda: ecds_stats(g)["update_success"] > before, what="reload")
        assert record["outcome"] == "applied" and record["actor"] == "alice"
        change = next(x for x in record["changes"] if x.get("section") == "rate_limits")
        assert change["id"] == "quotes-per-source" and change["change"] == "changed"
        assert change["fields"]["per_minute"] == {"before": 2, "after": 5}
        # the counts stay; the new limit admits three more
        for _ in range(3):
            assert c.raw("GET", c.https + QUOTE, APP, source="127.0.0.71").status_code == 200
        before = upstream_count(g)
        r = c.raw("GET", c.https + QUOTE, APP, source="127.0.0.71")
        assert_refused(g, r, 429, "rate_limited")
        assert upstream_count(g) == before
        # a rule the core refuses is not applied; one pushed past the CLI is refused by the
        # filter: the last good policy stays in force
        bad = policy()
        bad["rate_limits"][1]["per_minute"] = 0
        with pytest.raises(gw.PolicyRejected, match="per_minute"):
            gw.apply_policy(json.dumps(bad), g.layout, actor="alice", source="test")
        assert not reload(g, bad)
        assert c.raw("GET", c.https + QUOTE, APP, source="127.0.0.71").status_code == 429
    finally:
        g.stop()


def test_by_user_and_business_function(target):  # RL-2
    t = target

    def as_user(i: int, user: str):
        return t.send(i, t.sign("demo-fund", extra=["--header", f"x-user-id: {user}", "--cover", "x-user-id"]))

    assert as_user(0, "u-1").status_code == 200
    limited(t, 1, as_user(1, "u-1"), "fund-user", "minute")
    assert as_user(2, "u-2").status_code == 200
    limited(t, 3, as_user(3, "u-2"), "fund-user", "minute")


def test_the_gateways_own_session_endpoints_are_limited(tmp_path, secret):  # RL-1, SES-1, SES-3
    doc = session_policy(idle=60, lifetime=300)
    doc["rate_limits"] = [{"id": "establish", "by": ["app"], "apis": ["session.create"], "per_minute": 2},
                          {"id": "logout", "by": ["app"], "apis": ["session.logout"], "per_minute": 1}]
    g = start_gateway(tmp_path / "gw", doc, secret=secret)
    try:
        c = Client(g, secret)
        body = b'{"caller_code":"demo-partner","mac":"aa:bb:cc:dd:ee:01"}'

        def establish():
            return c.send(c.sign("POST", "/apisec/v1/sessions", body=body, keyid="demo-partner-hmac"))

        def logout(sid: str):
            extra = ["--header", f"x-session-id: {sid}", "--header", "x-device-mac: aa:bb:cc:dd:ee:01",
                     "--cover", "x-session-id", "--cover", "x-device-mac"]
            return c.send(c.sign("DELETE", "/apisec/v1/sessions", keyid="demo-partner-hmac", extra=extra))

        first, second = establish(), establish()
        assert first.status_code == 201 and second.status_code == 201
        r = establish()
        audit = assert_refused(g, r, 429, "rate_limited")
        assert audit["rate_limits"] == [{"rule": "establish", "window": "minute", "action": "refuse"}]
        assert "retry-after" in r.headers
        assert logout(first.json()["session_id"]).status_code == 200
        r = logout(second.json()["session_id"])
        audit = assert_refused(g, r, 429, "rate_limited")
        assert audit["rate_limits"] == [{"rule": "logout", "window": "minute", "action": "refuse"}]
    finally:
        g.stop()


@pytest.mark.cluster
def test_exactly_n_of_m_concurrent_calls_across_replicas(tmp_path, secret):  # RL-1, RL-2
    doc = policy()
    doc["rate_limits"] = [{"id": "burst", "by": ["app", "api"], "apis": ["info.research"], "per_minute": 10}]
    t = Target("cluster", tmp_path, secret, doc)
    try:
        signed = [t.sign("demo-partner") for _ in range(30)]
        before = t.upstream()
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(pool.map(lambda i: t.send(i, signed[i]).status_code, range(30)))
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 20, statuses
        assert t.upstream() - before == 10
    finally:
        t.stop()


@pytest.mark.cluster
def test_a_quota_holds_across_a_restart_and_a_store_that_cannot_answer_refuses(tmp_path, secret):  # RL-1
    t = Target("cluster", tmp_path, secret, policy())
    try:
        for i in range(2):
            assert t.call(i, "demo-quota").status_code == 200
        t.pair.restart()
        limited(t, 0, t.call(0, "demo-quota"), "quota-daily", "quota_day")
        limited(t, 1, t.call(1, "demo-quota"), "quota-daily", "quota_day")
        # the store cannot answer: refused, never counted as passed
        t.pair.store.stop()
        before = t.upstream()
        r = t.call(0, "demo-vendor")
        assert_refused(t.g(0), r, 503, "state_unavailable")
        assert t.upstream() == before
    finally:
        t.stop()
