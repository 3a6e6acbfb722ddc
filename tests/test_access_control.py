"""Access control through a real Envoy: grants and their validity (PERM-1..PERM-6, OPS-3), black
and white lists and source ranges (BWL-1..BWL-3, OPS-5), identity bound to TLS (ID-2, ID-3,
DATA-1, DATA-2), API lifecycle and suspension (OPS-1, MON-5), automatic bans (PERM-4, RL-3,
MON-4, MON-6). Every rule has an accepted and a refused case; refusals check status, code and
the audit record."""
from __future__ import annotations

import datetime
import json
import ssl
import time
import warnings

import pytest
from conftest import SECRET_VAR, Client, audit_lines, base_policy, decided, flushed_stat, gw, new_secret, read_audit, start_gateway
from helpers import REVIEW, assert_refused, ecds_stats, upstream_count, wait_for


def hmac_app(app_id: str, **extra) -> dict:
    return {"id": app_id, "credentials": [{"id": f"{app_id}-hmac", "alg": "hmac-sha256", "secret_env": SECRET_VAR}], **extra}


def s0_api(api_id: str, path: str, state: str) -> dict:
    return {"id": api_id, "method": "GET", "path": path, "level": "S0", "service_object": "toC", "access": "read",
            "user_auth": False, "personal_info": False, "function": "public_info", "state": state, "review": REVIEW}


def access_policy() -> dict:
    doc = base_policy()
    utc_hour = datetime.datetime.now(datetime.timezone.utc).hour
    closed_from = (utc_hour + 2) % 24  # a window that is certainly closed for the next hour
    doc["apps"] += [
        hmac_app("t-limited"), hmac_app("t-future"), hmac_app("t-expired"), hmac_app("t-window"),
        hmac_app("t-nogrant"), hmac_app("t-users"), hmac_app("t-blocked"), hmac_app("t-outsider"),
        hmac_app("t-suspended", suspended=True),
        hmac_app("t-ranges-ok", allowed_ips=["127.0.0.0/8", "::1/128"]),
        hmac_app("t-ranges-no", allowed_ips=["10.0.0.0/8", "2001:db8::/32"]),
    ]
    research = ["info.research"]
    doc["grants"] += [
        {"id": "t-limited-2", "app": "t-limited", "apis": research, "max_uses": 2},
        {"id": "t-future", "app": "t-future", "apis": research, "not_before": "2099-01-01T00:00:00+08:00"},
        {"id": "t-expired", "app": "t-expired", "apis": research, "not_after": "2020-01-01T00:00:00+08:00"},
        {"id": "t-window", "app": "t-window", "apis": research, "timezone": "UTC",
         "windows": [{"from": f"{closed_from:02d}:00", "to": f"{closed_from:02d}:30"}]},
        {"id": "t-users", "app": "t-users", "apis": research, "users": ["u-1", "u-gone"]},
        {"id": "t-blocked", "app": "t-blocked", "apis": research},
        {"id": "t-outsider", "app": "t-outsider", "apis": research},
        {"id": "t-suspended", "app": "t-suspended", "apis": research},
        {"id": "t-ranges-ok", "app": "t-ranges-ok", "apis": research},
        {"id": "t-ranges-no", "app": "t-ranges-no", "apis": research},
    ]
    doc["opted_out_users"] = ["u-gone"]
    doc["lists"] = [
        {"id": "bl-app-ip", "mode": "deny", "apis": ["*"], "entries": [{"app": "t-blocked", "ip": "127.0.0.1"}, {"user": "u-frozen"}]},
        {"id": "wl-research", "mode": "allow", "apis": ["info.research"],
         "entries": [{"app": a} for a in ["demo-partner", "demo-desk", "t-nogrant", "t-limited", "t-future", "t-expired", "t-window",
                                          "t-users", "t-blocked", "t-suspended", "t-ranges-ok", "t-ranges-no"]]},
    ]
    doc["apis"] += [
        s0_api("beta.feature", "/api/v1/beta/feature", "draft"),
        s0_api("legacy.feature", "/api/v1/legacy/feature", "retired"),
        s0_api("maint.feature", "/api/v1/maint/feature", "offline"),
        s0_api("grouped.feature", "/api/v1/grouped/feature", "online"),
    ]
    doc["api_groups"].append({"id": "degraded", "apis": ["grouped.feature"], "state": "offline"})
    return doc


@pytest.fixture(scope="module")
def acc(tmp_path_factory):
    secret = new_secret()
    g = start_gateway(tmp_path_factory.mktemp("access"), access_policy(), secret=secret)
    yield g, Client(g, secret)
    g.stop()


def research(client: Client, app: str, extra=None, base=None, headers=None):
    signed = client.sign("GET", "/api/v1/info/research/r-1", app=app, keyid=f"{app}-hmac", extra=extra, base=base)
    hdrs = list(signed["headers"].items()) + (headers or [])
    return client.send(signed, hdrs)


def allowed(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["headers"]


# ------------------------------------------------------------------ grants (PERM-2, PERM-5, OPS-3)

def test_s1_needs_a_grant(acc):  # PERM-2
    g, client = acc
    assert allowed(research(client, "demo-partner"))["x-apisec-app"] == "demo-partner"
    audit = assert_refused(g, research(client, "t-nogrant"), 403, "no_grant")
    assert audit["app"] == "t-nogrant" and audit["api"] == "info.research"


def test_s0_needs_no_grant(acc):  # PERM-2
    g, client = acc
    r = client.get("/api/v1/market/quotes/1", headers={"x-app-id": "t-nogrant"})
    assert r.status_code == 200


def test_grant_contract_period(acc):  # PERM-5
    g, client = acc
    assert_refused(g, research(client, "t-future"), 403, "grant_not_yet_valid")
    assert_refused(g, research(client, "t-expired"), 403, "grant_expired")


def test_grant_time_window(acc):  # PERM-5
    g, client = acc
    assert_refused(g, research(client, "t-window"), 403, "grant_outside_window")


def test_grant_use_count_holds_across_workers_and_reload(acc):  # PERM-5
    g, client = acc
    assert allowed(research(client, "t-limited"))["x-apisec-app"] == "t-limited"
    assert research(client, "t-limited").status_code == 200
    audit = assert_refused(g, research(client, "t-limited"), 403, "grant_exhausted")
    assert audit["app"] == "t-limited"
    before = ecds_stats(g)["update_success"]
    gw.write_ecds(json.dumps(access_policy()), g.layout)  # the same policy, reloaded
    wait_for(lambda: ecds_stats(g)["update_success"] > before, what="reload")
    assert_refused(g, research(client, "t-limited"), 403, "grant_exhausted")


def test_audit_names_the_grant(acc):  # OPS-3
    g, client = acc
    r = research(client, "demo-partner")
    rec = read_audit(g, r.json()["headers"]["x-request-id"])
    assert rec["audit"]["grant"] == "demo-partner-info"


# ------------------------------------------------------------------ users and opt-out (PERM-1, PERM-6)

def test_user_grant_and_opt_out(acc):  # PERM-1 (user dimension), PERM-6
    g, client = acc
    seen = allowed(research(client, "t-users", extra=["--header", "x-user-id: u-1", "--cover", "x-user-id"]))
    assert seen["x-apisec-user"] == "u-1"
    assert_refused(g, research(client, "t-users", extra=["--header", "x-user-id: u-2", "--cover", "x-user-id"]), 403, "no_grant")
    assert_refused(g, research(client, "t-users", extra=["--header", "x-user-id: u-gone", "--cover", "x-user-id"]),
                   403, "user_opted_out")


def test_user_claim_must_be_signed(acc):  # PERM-1: the user dimension counts only when signed
    g, client = acc
    r = research(client, "t-users", headers=[("x-user-id", "u-1")])
    assert_refused(g, r, 401, "component_not_covered")


# ------------------------------------------------------------------ field permissions (PERM-1)

def test_forbidden_request_field(acc):  # PERM-1 (field dimension)
    g, client = acc
    ok = client.sign("POST", "/api/v1/orders", body=b'{"symbol":"600000","qty":100}', keyid="demo-partner-p256")
    assert client.send(ok).status_code == 200
    bad = client.sign("POST", "/api/v1/orders", body=b'{"symbol":"600000","qty":100,"margin_override":true}',
                      keyid="demo-partner-p256")
    audit = assert_refused(g, client.send(bad), 403, "field_forbidden")
    assert "marginoverride" in audit["detail"]  # the rule, in its normal form


def test_hidden_response_fields_removed(acc):  # PERM-1 (field dimension)
    g, client = acc
    r = client.send(client.sign("GET", "/api/v1/accounts/8800123/balance", keyid="demo-partner-p256"))
    assert r.status_code == 200
    doc = r.json()
    assert doc["balance"] == "102400.50"
    assert "id_number" not in doc and "mobile" not in doc
    assert int(r.headers["content-length"]) == len(r.content), "content-length fixed after filtering"


# ------------------------------------------------------------------ lists and source ranges (BWL-1..3, OPS-5)

def test_blacklist_app_plus_ip(acc):  # BWL-1, BWL-2
    g, client = acc
    audit = assert_refused(g, research(client, "t-blocked"), 403, "blacklisted")
    assert "bl-app-ip" in audit["detail"]


def test_blacklist_user(acc):  # BWL-1
    g, client = acc
    r = research(client, "demo-partner", extra=["--header", "x-user-id: u-frozen", "--cover", "x-user-id"])
    assert_refused(g, r, 403, "blacklisted")


def test_whitelist_mode(acc):  # BWL-2
    g, client = acc
    assert_refused(g, research(client, "t-outsider"), 403, "not_whitelisted")
    # a listed app passes the list (issue 21 item 16: this accepted 200 or 403 before)
    assert allowed(research(client, "demo-partner"))["x-apisec-app"] == "demo-partner"


def test_app_source_ranges_and_forged_xff(acc):  # BWL-1, OPS-5
    g, client = acc
    assert allowed(research(client, "t-ranges-ok"))["x-apisec-app"] == "t-ranges-ok"
    audit = assert_refused(g, research(client, "t-ranges-no"), 403, "ip_not_allowed")
    assert audit["client_ip"] == "127.0.0.1"
    # A forged X-Forwarded-For from an untrusted client changes nothing (xff_num_trusted_hops: 0).
    r = research(client, "t-ranges-no", headers=[("x-forwarded-for", "10.1.2.3")])
    assert_refused(g, r, 403, "ip_not_allowed")
    r = research(client, "t-ranges-ok", headers=[("x-forwarded-for", "10.1.2.3")])
    assert r.status_code == 200


def test_list_change_takes_effect_live(tmp_path):  # BWL-3
    secret = new_secret()
    g = start_gateway(tmp_path, base_policy(), secret=secret)
    try:
        client = Client(g, secret)
        assert research(client, "demo-partner").status_code == 200
        doc = base_policy()
        doc["lists"] = [{"id": "bl-partner", "mode": "deny", "apis": ["info.*"], "entries": [{"app": "demo-partner"}]}]
        before = ecds_stats(g)["update_success"]
        gw.apply_policy(json.dumps(doc), g.layout, actor="alice", source="test")
        wait_for(lambda: ecds_stats(g)["update_success"] > before, what="reload")
        assert_refused(g, research(client, "demo-partner"), 403, "blacklisted")
        # the change is in the operations log: who, when, what (BWL-3)
        last = json.loads(g.layout.ops_log.read_text().splitlines()[-1])
        assert last["actor"] == "alice" and last["ts"]
        assert {"section": "lists", "id": "bl-partner", "change": "added"} in last["changes"]
        assert client.get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"}).status_code == 200
    finally:
        g.stop()


# ------------------------------------------------------------------ TLS and mTLS identity (ID-2, ID-3, DATA-1, DATA-2)

def test_mtls_certificate_identifies_the_app(acc):  # ID-2, ID-3
    g, client = acc
    hdrs = [("x-app-id", "demo-partner")]
    r = client.raw("GET", client.mtls + "/api/v1/accounts/8800123/balance", hdrs, cert="client-demo-partner")
    assert r.status_code == 200, r.text
    rec = read_audit(g, r.json()["headers"]["x-request-id"])
    assert rec["audit"]["auth"] == "certificate" and rec["audit"]["level"] == "S2"


def test_mtls_s3_still_needs_signature(acc):  # DATA-4
    g, client = acc
    hdrs = [("x-app-id", "demo-partner")]
    r = client.raw("DELETE", client.mtls + "/api/v1/orders/o-1", hdrs, cert="client-demo-partner")
    assert_refused(g, r, 401, "signature_missing")
    signed = client.sign("DELETE", "/api/v1/orders/o-1", keyid="demo-partner-p256", base=client.mtls)
    r = client.send(signed, cert="client-demo-partner")
    assert r.status_code == 200
    assert read_audit(g, r.json()["headers"]["x-request-id"])["audit"]["auth"] == "certificate+signature"


def test_mtls_wrong_app_certificate_refused(acc):  # ID-3
    g, client = acc
    r = client.raw("GET", client.mtls + "/api/v1/accounts/1/balance", [("x-app-id", "demo-partner")], cert="client-demo-desk")
    assert_refused(g, r, 401, "certificate_mismatch")


def test_mtls_unknown_ca_and_no_certificate_fail_the_handshake(acc):  # ID-3
    g, client = acc
    for cert in ("client-rogue", None):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            client.raw("GET", client.mtls + "/api/v1/accounts/1/balance", [("x-app-id", "demo-partner")], cert=cert)
    assert g.stat("listener.127.0.0.1_%d.ssl.fail_verify_no_cert" % g.layout.mtls_port) \
        + g.stat("listener.127.0.0.1_%d.ssl.fail_verify_error" % g.layout.mtls_port) \
        + g.stat("listener.127.0.0.1_%d.ssl.connection_error" % g.layout.mtls_port) >= 1


def handshake_refused_by_gateway(g, ctx) -> bool:
    """True when the gateway (not the client library) ended the handshake: Envoy counts it."""
    import socket

    stat = "listener.127.0.0.1_%d.ssl.connection_error" % g.layout.https_port
    before = g.stat(stat)
    with socket.create_connection(("127.0.0.1", g.layout.https_port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                return False
        except (ssl.SSLError, OSError):
            pass
    deadline = time.time() + 5
    while time.time() < deadline:
        if g.stat(stat) > before:
            return True
        time.sleep(0.1)
    return False


def test_tls_versions_and_ciphers(acc):  # DATA-1
    g, client = acc
    import http.client

    ok = client.tls_context()
    ok.minimum_version = ok.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection("127.0.0.1", g.layout.https_port, context=ok, timeout=5)
    conn.request("GET", "/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"})
    assert conn.getresponse().status == 200

    weak = client.tls_context()
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # CBC without AEAD: not in the gateway's list
    assert handshake_refused_by_gateway(g, weak)

    old = client.tls_context()
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert handshake_refused_by_gateway(g, old)


# ------------------------------------------------------------------ lifecycle and isolation (OPS-1, MON-5)

@pytest.mark.parametrize("path,status,code", [
    ("/api/v1/beta/feature", 404, "api_not_published"),
    ("/api/v1/legacy/feature", 410, "api_retired"),
    ("/api/v1/maint/feature", 503, "api_offline"),
    ("/api/v1/grouped/feature", 503, "api_offline"),
])
def test_lifecycle_states(acc, path, status, code):  # OPS-1, MON-5 (group switch)
    g, client = acc
    r = client.get(path, headers={"x-app-id": "demo-partner"})
    audit = assert_refused(g, r, status, code)
    if status == 503:
        assert r.headers["retry-after"] == "300"
    # the call is recorded with the API and the registered app it claims (unverified, as for a
    # shadow-API call), so that the callers still using a retired API can be found and told
    assert audit.get("app") == "demo-partner" and audit.get("api"), audit
    r = client.get(path, headers={"x-app-id": "nobody-registered"})
    assert assert_refused(g, r, status, code).get("app") is None


def test_suspended_app_isolated(acc):  # MON-5
    g, client = acc
    assert_refused(g, research(client, "t-suspended"), 403, "app_suspended")
    assert research(client, "demo-partner").status_code == 200


# ------------------------------------------------------------------ automatic bans (PERM-4, RL-3, MON-4, MON-6)

def test_a_whitelisted_caller_that_keeps_calling_unauthorized_loses_its_whitelisting(tmp_path):  # PERM-7
    """PERM-7: a caller that keeps making unauthorized calls is taken off automatically even
    where a whitelist names it: the ban is checked before the lists, so the API the whitelist
    and its grant open is refused `banned` too, with its audit record and nothing upstream."""
    doc = base_policy()
    doc["apps"].append(hmac_app("t-listed"))
    doc["grants"].append({"id": "t-listed", "app": "t-listed", "apis": ["info.research"], "users": ["u-1"]})
    doc["lists"].append({"id": "wl-listed", "mode": "allow", "apis": ["info.research"],
                         "entries": [{"app": "t-listed"}, {"app": "demo-partner"}]})
    doc["bans"] = {"threshold": 3, "window_seconds": 60, "ban_seconds": 600}
    secret = new_secret()
    g = start_gateway(tmp_path, doc, secret=secret, concurrency=1)
    try:
        client = Client(g, secret)
        as_user = lambda u: ["--header", f"x-user-id: {u}", "--cover", "x-user-id"]  # noqa: E731
        assert research(client, "t-listed", extra=as_user("u-1")).status_code == 200, "whitelisted and granted"
        for i in range(3):  # validly signed calls for users its grant does not cover
            assert research(client, "t-listed", extra=as_user(f"u-{i + 2}")).json()["error"] == "no_grant"
        before = upstream_count(g)
        audit = assert_refused(g, research(client, "t-listed", extra=as_user("u-1")), 403, "banned")
        assert audit["app"] == "t-listed" and upstream_count(g) == before
        assert research(client, "demo-partner").status_code == 200, "the list's other members are unaffected"
    finally:
        g.stop()


def test_bans_by_app_by_ip_on_429_and_lift(tmp_path):  # PERM-4, RL-3, MON-4, MON-6
    doc = base_policy()
    doc["apps"] += [hmac_app("t-noisy"), hmac_app("t-limited-rate")]
    doc["grants"] += [{"id": "t-noisy", "app": "t-noisy", "apis": ["info.research"], "users": ["u-1"]},
                      {"id": "t-limited-rate", "app": "t-limited-rate", "apis": ["info.research"]}]
    doc["bans"] = {"threshold": 3, "window_seconds": 60, "ban_seconds": 600}
    secret = new_secret()
    g = start_gateway(tmp_path, doc, secret=secret, rate_limits={"t-limited-rate": (2, 60)})
    try:
        client = Client(g, secret)
        # 1. by app: three refusals of the authenticated app (validly signed, but for a user its
        # grant does not cover), then even a valid request is refused
        as_user = lambda u: ["--header", f"x-user-id: {u}", "--cover", "x-user-id"]  # noqa: E731
        for i in range(3):
            assert research(client, "t-noisy", extra=as_user(f"u-{i + 2}")).json()["error"] == "no_grant"
        audit = assert_refused(g, research(client, "t-noisy", extra=as_user("u-1")), 403, "banned")
        assert audit["app"] == "t-noisy"
        assert g.stat("wasmcustom.apisec.bans_started") == 1
        assert research(client, "demo-partner").status_code == 200, "other apps unaffected"

        # 2. Envoy's rate limiter answers 429 to the authenticated app; those count too (RL-3)
        allowed_before = flushed_stat(g, "wasmcustom.apisec.allowed")
        limited_before = decided(g, "deny", "rate_limited")
        codes = [research(client, "t-limited-rate").status_code for _ in range(5)]
        assert codes[:2] == [200, 200] and codes[2:] == [429, 429, 429], codes
        # each request counted once, by its outcome: the 429s are denials, not also allowed
        assert decided(g, "deny", "rate_limited") == limited_before + 3
        assert flushed_stat(g, "wasmcustom.apisec.allowed") == allowed_before + 2
        audit = assert_refused(g, research(client, "t-limited-rate"), 403, "banned")
        assert audit["app"] == "t-limited-rate"
        limited = [x for x in audit_lines(g) if x.get("status") == 429]
        assert limited and limited[0]["audit"]["code"] == "rate_limited"

        # 3. by source address when the caller is not authenticated
        for _ in range(3):
            assert client.get("/api/v1/market/quotes/1", headers={"x-app-id": "nobody"}).json()["error"] == "unknown_app"
        audit = assert_refused(g, client.get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"}), 403, "banned")
        assert "source 127.0.0.1" in audit["detail"]

        # 4. the operator lifts the bans through the policy; they end at once
        # lifted "as of" one second from now: every ban that began before then is void
        now = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        doc["bans"]["lifted"] = [{"app": "t-noisy", "at": now, "by": "ops", "reason": "partner fixed its signer"},
                                 {"ip": "127.0.0.1", "at": now, "by": "ops", "reason": "test client"}]
        before = ecds_stats(g)["update_success"]
        gw.write_ecds(json.dumps(doc), g.layout)
        wait_for(lambda: ecds_stats(g)["update_success"] > before, what="reload")
        assert research(client, "t-noisy", extra=["--header", "x-user-id: u-1", "--cover", "x-user-id"]).status_code == 200
        assert client.get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"}).status_code == 200
    finally:
        g.stop()


def test_a_limiters_429_is_audited_and_counted_without_bans(tmp_path):  # RL-3, LOG-1
    """Issue 21 item 10: with no `bans` section, Envoy's 429 after apisec was recorded
    `decision: allow` and counted as allowed on 91ff9c0. It is a refusal, `rate_limited`."""
    doc = base_policy()
    assert "bans" not in doc
    secret = new_secret()
    g = start_gateway(tmp_path, doc, secret=secret, rate_limits={"demo-partner": (2, 60)})
    try:
        client = Client(g, secret)
        allowed_before = flushed_stat(g, "wasmcustom.apisec.allowed")
        responses = [research(client, "demo-partner") for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 429, 429]
        assert decided(g, "deny", "rate_limited") == 2
        assert flushed_stat(g, "wasmcustom.apisec.allowed") == allowed_before + 2
        time.sleep(1.5)
        limited = [x for x in audit_lines(g) if x.get("status") == 429]
        assert len(limited) == 2
        for rec in limited:
            assert rec["audit"]["decision"] == "deny" and rec["audit"]["code"] == "rate_limited", rec
            assert rec["audit"]["app"] == "demo-partner"
    finally:
        g.stop()
