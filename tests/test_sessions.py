"""Sessions (SES-1 … SES-4, OPS-6) against a real Envoy: establish at the endpoint the gateway
answers itself, use with the session bound to app, client IP and device MAC, idle timeout and
absolute lifetime, logout, forced end by an operator through `apisec sessions end` on the
operator listener (and not from the public listeners), eviction when the store is full, and a
policy reload; then the same on the `cluster` state backend, with two replicas sharing one real
Redis: a session created on one replica is used, logged in, logged out and force-ended on the
other. Each refused case checks status, code, audit record and that the upstream got nothing."""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time

import pytest
import requests

from conftest import CLI, Client, audit_lines, flushed_stat, gw, read_audit, start_gateway
from helpers import PUBLIC, Pair, metric, session_policy

MAC = "AA-BB-CC-DD-EE-01"
NORMAL_MAC = "aa:bb:cc:dd:ee:01"


@pytest.fixture(scope="module")
def sgw(tmp_path_factory, secret):
    g = start_gateway(tmp_path_factory.mktemp("gw-sessions"), session_policy(idle=60, lifetime=600), secret=secret,
                      concurrency=2)
    yield g
    g.stop()


def upstream(g) -> int:
    return g.stat("cluster.backend.upstream_rq_total")


def establish(c: Client, app: str = "demo-partner", mac: str = MAC, keyid: str | None = None):
    body = json.dumps({"caller_code": app, "mac": mac, "ip": "10.1.2.3"}).encode()
    signed = c.sign("POST", "/apisec/v1/sessions", body=body, app=app, keyid=keyid or f"{app}-hmac")
    return c.send(signed)


def call(c: Client, sid: str, *, app: str = "demo-partner", mac: str = MAC, cover: bool = True,
         source: str | None = None, method: str = "GET", path: str = "/api/v1/watchlist",
         keyid: str | None = None, user: str | None = None):
    extra = ["--header", f"x-session-id: {sid}", "--header", f"x-device-mac: {mac}"]
    if cover:
        extra += ["--cover", "x-session-id", "--cover", "x-device-mac"]
    if user:
        extra += ["--header", f"x-user-id: {user}", "--cover", "x-user-id"]
    signed = c.sign(method, path, app=app, keyid=keyid or f"{app}-hmac", extra=extra)
    return c.send(signed, source=source)


def login(c: Client, sid: str, report: str):
    """The firm's login API (upstream: the demo login service, which reports `report`)."""
    from urllib.parse import quote

    return call(c, sid, method="POST", path=f"/api/v1/users/login?report={quote(report)}")


def new_session(c: Client, **kw) -> str:
    r = establish(c, **kw)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def logout_records(g, count: int = 1, timeout: float = 8.0) -> list[dict]:
    """The audit records of logouts on `g` (the answer carries no request ID), once there are
    `count` of them."""
    deadline = time.time() + timeout
    while True:
        recs = [r["audit"] for r in audit_lines(g)
                if r["audit"] and r["audit"].get("session_event") == "logged_out"]
        if len(recs) >= count or time.time() > deadline:
            return recs
        time.sleep(0.2)


def refused(g, r, status: int, code: str, before: int):
    assert r.status_code == status and r.json()["error"] == code, r.text
    rec = read_audit(g, r.json()["request_id"])["audit"]
    assert rec["decision"] == "deny" and rec["code"] == code
    assert upstream(g) == before, "the upstream received the refused request"
    return rec


def test_establish_and_use(sgw, secret):  # SES-1
    c = Client(sgw, secret)
    before = upstream(sgw)
    r = establish(c)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    doc = r.json()
    sid = doc["session_id"]
    assert len(sid) == 32 and doc["idle_timeout_seconds"] == 60 and doc["expires_at"] > time.time()
    assert upstream(sgw) == before, "the gateway answers the session endpoint itself"
    rec = read_audit(sgw, r.headers.get("x-request-id") or _last_request_id(sgw))["audit"]
    assert rec["session_event"] == "created" and rec["session"] and sid not in json.dumps(rec)
    ok = call(c, sid)
    assert ok.status_code == 200, ok.text
    assert ok.json()["headers"]["x-session-id"] == sid
    assert upstream(sgw) == before + 1
    assert read_audit(sgw, ok.json()["headers"]["x-request-id"])["audit"]["session"] == rec["session"]


def _last_request_id(g) -> str:
    time.sleep(1.5)
    return json.loads(g.layout.audit_log.read_text().splitlines()[-1])["request_id"]


def test_session_required_and_covered(sgw, secret):  # SES-1
    c = Client(sgw, secret)
    sid = new_session(c)
    before = upstream(sgw)
    plain = c.sign("GET", "/api/v1/watchlist")
    refused(sgw, c.send(plain), 401, "session_required", before)
    # The session headers must be covered by the signature.
    refused(sgw, call(c, sid, cover=False), 401, "component_not_covered", before)
    # A bad MAC is no session.
    refused(sgw, call(c, sid, mac="not-a-mac"), 401, "session_required", before)
    # A made-up session.
    refused(sgw, call(c, "A" * 32), 401, "session_invalid", before)


def test_session_is_bound_to_app_ip_and_mac(sgw, secret):
    c = Client(sgw, secret)
    sid = new_session(c)
    before = upstream(sgw)
    refused(sgw, call(c, sid, mac="aa:bb:cc:dd:ee:02"), 401, "session_invalid", before)
    refused(sgw, call(c, sid, source="127.0.0.2"), 401, "session_invalid", before)
    refused(sgw, call(c, sid, app="partner-b"), 401, "session_invalid", before)
    # The holder still gets through: a refused misuse does not end the session.
    assert call(c, sid, mac=NORMAL_MAC).status_code == 200


@pytest.fixture
def short_sessions(tmp_path, secret):
    g = start_gateway(tmp_path, session_policy(idle=3, lifetime=7), secret=secret, concurrency=1)
    yield g
    g.stop()


def test_idle_timeout_and_absolute_lifetime(short_sessions, secret):  # SES-2
    """Idle timeout 3 s, absolute lifetime 7 s (whole seconds, as the gateway counts them)."""
    sgw = short_sessions
    c = Client(sgw, secret)
    idle = new_session(c)
    kept = new_session(c)
    for _ in range(2):  # used every 2 s: alive while it is used ...
        time.sleep(2)
        assert call(c, kept).status_code == 200
    before = upstream(sgw)
    rec = refused(sgw, call(c, idle), 401, "session_expired", before)
    assert rec["detail"].startswith("idle for"), rec
    time.sleep(1.8)
    assert call(c, kept).status_code == 200
    # ... until its absolute lifetime, used or not.
    time.sleep(3)
    before = upstream(sgw)
    rec = refused(sgw, call(c, kept), 401, "session_expired", before)
    assert "absolute lifetime" in rec["detail"], rec


def test_logout(sgw, secret):  # SES-3
    c = Client(sgw, secret)
    sid = new_session(c)
    assert login(c, sid, "user=u-dave; factors=2").status_code == 200
    before = upstream(sgw)
    r = call(c, sid, method="DELETE", path="/apisec/v1/sessions")
    assert r.status_code == 200 and r.json() == {"ended": True}
    assert upstream(sgw) == before
    # the audit record names the user logged in on the session it ended
    recs = [r for r in logout_records(sgw) if r.get("user") == "u-dave"]
    assert len(recs) == 1 and recs[0]["decision"] == "allow", logout_records(sgw)
    refused(sgw, call(c, sid), 401, "session_invalid", before)
    # Logging out someone else's session (another MAC) is refused and leaves it alive.
    other = new_session(c)
    refused(sgw, call(c, other, mac="aa:bb:cc:dd:ee:09", method="DELETE", path="/apisec/v1/sessions"),
            401, "session_invalid", before)
    assert call(c, other).status_code == 200


def operator_end(g, cert: str, *scope: str) -> subprocess.CompletedProcess:
    certs = g.layout.certs
    return subprocess.run([str(CLI), "sessions", "end", "--url", f"https://localhost:{g.layout.operator_port}",
                           "--cert", str(certs / f"{cert}.pem"), "--key", str(certs / f"{cert}.key"),
                           "--ca", str(certs / "ca.pem"), *scope], capture_output=True, text=True, timeout=30)


def test_forced_end_by_an_operator(sgw, secret):  # SES-4, OPS-6
    c = Client(sgw, secret)
    one, two = new_session(c), new_session(c)
    b1 = new_session(c, app="partner-b")
    out = operator_end(sgw, "operator-alice", "--session", one)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ended": "one session"}
    time.sleep(1.5)  # the access log reaches the disk within a second
    rec = json.loads(sgw.layout.audit_log.read_text().splitlines()[-1])
    assert rec["session_event"] == "ended_by_operator" and rec["decision"] == "allow"
    assert rec["operator"] == "spiffe://apisec.demo/operator/alice: one session" and one not in json.dumps(rec)
    before = upstream(sgw)
    refused(sgw, call(c, one), 401, "session_invalid", before)
    assert call(c, two).status_code == 200
    # Every session of an app at once; another app's sessions stay.
    out = operator_end(sgw, "operator-alice", "--app", "demo-partner")
    assert out.returncode == 0, out.stderr
    before = upstream(sgw)
    rec = refused(sgw, call(c, two), 401, "session_invalid", before)
    assert "operator" in rec["detail"]
    assert call(c, b1, app="partner-b").status_code == 200
    # A session created after the operator's end is not affected.
    assert call(c, new_session(c)).status_code == 200
    # An operator the policy does not name.
    out = operator_end(sgw, "operator-mallory", "--app", "partner-b")
    assert out.returncode != 0 and "403" in out.stderr and "operator_not_allowed" in out.stderr
    request_id = json.loads(out.stderr.split(": ", 2)[-1])["request_id"]
    assert read_audit(sgw, request_id)["audit"]["code"] == "operator_not_allowed"
    assert call(c, b1, app="partner-b").status_code == 200


def test_operator_path_is_unreachable_from_public_listeners(sgw, secret):
    c = Client(sgw, secret)
    sid = new_session(c)
    s = requests.Session()
    s.trust_env = False
    before = upstream(sgw)
    body = json.dumps({"session_id": sid})
    for base in (c.https, c.http):
        r = s.post(f"{base}/apisec/v1/operator/sessions/end", data=body, verify=str(sgw.layout.certs / "ca.pem"),
                   headers={"x-app-id": "demo-partner", "content-type": "application/json"}, timeout=10)
        assert r.status_code in (401, 403) and r.json()["error"] in ("unknown_api", "signature_missing"), r.text
    # An operator's certificate is not accepted by the partner mTLS listener either.
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        s.post(f"{c.mtls}/apisec/v1/operator/sessions/end", data=body, verify=str(sgw.layout.certs / "ca.pem"),
               cert=(str(sgw.layout.certs / "operator-alice.pem"), str(sgw.layout.certs / "operator-alice.key")),
               timeout=10)
    assert upstream(sgw) == before
    assert call(c, sid).status_code == 200


def test_sessions_survive_a_policy_reload(sgw, secret):
    c = Client(sgw, secret)
    sid = new_session(c)
    record = gw.apply_policy(json.dumps(session_policy(idle=60, lifetime=600)), sgw.layout, actor="test",
                             source="reload")
    assert record["outcome"] == "applied"
    assert call(c, sid).status_code == 200


def test_a_full_store_evicts_the_session_idle_longest(tmp_path, secret):
    doc = session_policy(idle=60, lifetime=120, entries=2)
    doc["sessions"]["max_per_app"] = 2  # this test's one app may fill the store
    g = start_gateway(tmp_path, doc, secret=secret, concurrency=1)
    try:
        c = Client(g, secret)
        first, second = new_session(c), new_session(c)
        time.sleep(1.1)  # the gateway counts idle time in whole seconds
        assert call(c, first).status_code == 200  # second is now idle longest
        third = new_session(c)
        before = upstream(g)
        refused(g, call(c, second), 401, "session_invalid", before)
        assert call(c, first).status_code == 200 and call(c, third).status_code == 200
        assert flushed_stat(g, "wasmcustom.apisec.sessions_evicted") == 1
    finally:
        g.stop()


# --- end users and two factors (ID-4) ------------------------------------------------------------

def test_login_with_two_factors_opens_user_bound_apis(sgw, secret):  # ID-4
    c = Client(sgw, secret)
    sid = new_session(c)
    r = login(c, sid, "user=U-Alice; factors=2")
    assert r.status_code == 200
    assert "x-apisec-login" not in {k.lower() for k in r.headers}, "the login report reached the client"
    rec = read_audit(sgw, r.json()["headers"]["x-request-id"])["audit"]
    assert rec["session_event"] == "user_logged_in" and rec["user"] == "u-alice"
    # The verified user goes upstream as x-apisec-user, at S1 and (two factors) at S2.
    ok = call(c, sid, path="/api/v1/users/news")
    assert ok.status_code == 200 and ok.json()["headers"]["x-apisec-user"] == "u-alice"
    ok = call(c, sid, path="/api/v1/users/profile", keyid="demo-partner-p256")
    assert ok.status_code == 200 and ok.json()["headers"]["x-apisec-user"] == "u-alice"
    # A client-sent user cannot override the session's user.
    before = upstream(sgw)
    refused(sgw, call(c, sid, path="/api/v1/users/news", user="u-mallory"), 403, "user_mismatch", before)
    assert call(c, sid, path="/api/v1/users/news", user="u-alice").status_code == 200


def order(c: Client, sid: str):
    """S3: place an order (user-bound in the securities example) on a session."""
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    signed = c.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256",
                    extra=["--session", sid, "--mac", MAC])
    return c.send(signed)


def test_one_factor_is_not_enough_at_s2_and_s3(sgw, secret):  # ID-4
    c = Client(sgw, secret)
    sid = new_session(c)
    assert login(c, sid, "user=u-bob; factors=1").status_code == 200
    assert call(c, sid, path="/api/v1/users/news").status_code == 200
    before = upstream(sgw)
    refused(sgw, call(c, sid, path="/api/v1/users/profile", keyid="demo-partner-p256"), 403, "mfa_required", before)
    refused(sgw, order(c, sid), 403, "mfa_required", before)
    # Two factors open the S3 API; the order goes upstream with the session's user.
    strong = new_session(c)
    assert login(c, strong, "user=u-bob; factors=2").status_code == 200
    r = order(c, strong)
    assert r.status_code == 200 and r.json()["headers"]["x-apisec-user"] == "u-bob", r.text


def test_the_session_id_is_not_in_the_audit_log_and_evidence_still_verifies(sgw, secret, tmp_path):  # LOG-4, SES-1, DATA-4
    """Issue 21 item 6: an S3 record's evidence held the raw x-session-id (a bearer secret) in
    its signature base on 91ff9c0. Now the base has `[sealed]` there, the ID is encrypted under
    the audit key, and `apisec audit verify --evidence --key-env` still re-verifies the
    signature; without the key it says it cannot."""
    import os

    from conftest import AUDIT_KEY, AUDIT_KEY_VAR

    c = Client(sgw, secret)
    sid = new_session(c)
    assert login(c, sid, "user=u-carol; factors=2").status_code == 200
    r = order(c, sid)
    assert r.status_code == 200, r.text
    rec = read_audit(sgw, r.json()["headers"]["x-request-id"])["audit"]
    ev = rec["evidence"]
    assert '"x-session-id": [sealed]' in ev["signature_base"] and ev["session_sealed"]
    # the hash of the signed base, which the log does not hold: the sealed ID's key stream and
    # how the verifier knows it opened it right
    assert ev["signature_base_sha256"] != base64.b64encode(hashlib.sha256(ev["signature_base"].encode()).digest()).decode()
    time.sleep(1.5)
    assert sid not in sgw.layout.audit_log.read_text(), "the session ID is in the audit log"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(session_policy(idle=60, lifetime=600)))
    args = [str(CLI), "audit", "verify", str(sgw.layout.audit_log), "--evidence", "--policy", str(policy),
            "--format", "json"]
    env = {**os.environ, AUDIT_KEY_VAR: AUDIT_KEY}
    out = subprocess.run(args + ["--key-env", AUDIT_KEY_VAR], capture_output=True, text=True, timeout=60, env=env)
    rep = json.loads(out.stdout)
    assert not [f for f in rep["findings"] if f["kind"].startswith("evidence")], rep["findings"]
    assert rep["evidence_verified"] == rep["evidence_checked"] >= 1
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    rep = json.loads(out.stdout)
    assert out.returncode == 1
    assert any(f["kind"] == "evidence_invalid" and "--key-env" in f["detail"] for f in rep["findings"]), rep


def test_user_bound_apis_need_a_logged_in_session(sgw, secret):  # ID-4
    c = Client(sgw, secret)
    sid = new_session(c)
    before = upstream(sgw)
    refused(sgw, call(c, sid, path="/api/v1/users/news"), 401, "user_login_required", before)
    # Without a session at all, even with a signed x-user-id.
    signed = c.sign("GET", "/api/v1/users/news", extra=["--header", "x-user-id: u-alice", "--cover", "x-user-id"])
    refused(sgw, c.send(signed), 401, "session_required", before)


def test_a_malformed_login_report_withholds_the_answer(sgw, secret):
    c = Client(sgw, secret)
    sid = new_session(c)
    r = login(c, sid, "user=u-carol; factors=many")
    assert r.status_code == 502 and r.json()["error"] == "login_report_invalid"
    assert "x-apisec-login" not in {k.lower() for k in r.headers}
    assert read_audit(sgw, r.json()["request_id"])["audit"]["code"] == "login_report_invalid"
    before = upstream(sgw)
    refused(sgw, call(c, sid, path="/api/v1/users/news"), 401, "user_login_required", before)


def test_opt_out_applies_to_the_session_user(sgw, secret):  # PERM-6 with ID-4
    c = Client(sgw, secret)
    sid = new_session(c)
    assert login(c, sid, "user=u-closed; factors=2").status_code == 200
    before = upstream(sgw)
    refused(sgw, call(c, sid, path="/api/v1/users/news"), 403, "user_opted_out", before)


def test_operator_ends_every_session_of_a_user(sgw, secret):  # SES-4, OPS-6
    c = Client(sgw, secret)
    s1, s2, other = new_session(c), new_session(c), new_session(c)
    for sid in (s1, s2):
        assert login(c, sid, "user=u-dave; factors=2").status_code == 200
    assert login(c, other, "user=u-erin; factors=2").status_code == 200
    out = operator_end(sgw, "operator-alice", "--user", "U-Dave")
    assert out.returncode == 0, out.stderr
    before = upstream(sgw)
    for sid in (s1, s2):
        refused(sgw, call(c, sid, path="/api/v1/users/news"), 401, "session_invalid", before)
    assert call(c, other, path="/api/v1/users/news").status_code == 200


# --- two replicas on the cluster state backend (SES-1 … SES-4, OPS-6, ID-4 across replicas) -------

class Replica:
    """One replica of a cluster pair behind the shared public name, signing and sending as Client
    does: the session helpers above work on it unchanged."""

    def __init__(self, pair, g, secret: str):
        self.pair, self.gw = pair, g
        self.client = Client(g, secret)

    def sign(self, method: str, path: str, **kw) -> dict:

        return self.client.sign(method, path, base=f"https://{PUBLIC}", **kw)

    def send(self, signed: dict, source: str | None = None):
        return self.pair.send(self.gw, signed, source=source)


@pytest.fixture(scope="module")
def cluster_pair(tmp_path_factory, secret):

    p = Pair(tmp_path_factory.mktemp("sessions-cluster"), secret, session_policy(idle=60, lifetime=600, entries=64))
    yield p
    p.stop()


def test_a_session_holds_across_replicas(cluster_pair, secret):  # SES-1, SES-2, SES-3, ID-4
    p = cluster_pair
    a, b = Replica(p, p.a, secret), Replica(p, p.b, secret)
    r = establish(a)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    created = read_audit(p.a, r.headers.get("x-request-id") or _last_request_id(p.a))["audit"]
    assert created["session_event"] == "created"
    # The store keeps a hash of the ID, never the ID (a bearer secret).
    keys = p.store.redis_cli("KEYS", "apisec:session:*").split()
    assert keys and all(sid not in k for k in keys)
    assert all(sid not in p.store.redis_cli("HGETALL", k) for k in keys)
    # Used on the other replica: the same session, named alike in both replicas' records.
    ok = call(b, sid)
    assert ok.status_code == 200, ok.text
    assert read_audit(p.b, ok.json()["headers"]["x-request-id"])["audit"]["session"] == created["session"]
    # Bound to the MAC, the IP and the app on every replica; a refused misuse leaves it alive.
    before = upstream(p.b)
    refused(p.b, call(b, sid, mac="aa:bb:cc:dd:ee:02"), 401, "session_invalid", before)
    refused(p.b, call(b, sid, source="127.0.0.2"), 401, "session_invalid", before)
    refused(p.b, call(b, sid, app="partner-b"), 401, "session_invalid", before)
    # A login through one replica (two factors) opens user-bound APIs on the other.
    r = login(a, sid, "user=U-Frank; factors=2")
    assert r.status_code == 200 and "x-apisec-login" not in {k.lower() for k in r.headers}
    ok = call(b, sid, path="/api/v1/users/profile", keyid="demo-partner-p256")
    assert ok.status_code == 200 and ok.json()["headers"]["x-apisec-user"] == "u-frank", ok.text
    before = upstream(p.b)
    refused(p.b, call(b, sid, path="/api/v1/users/news", user="u-mallory"), 403, "user_mismatch", before)
    # One factor, reported on B, is not enough at S2 on A.
    weak = new_session(b)
    assert login(b, weak, "user=u-gina; factors=1").status_code == 200
    before = upstream(p.a)
    refused(p.a, call(a, weak, path="/api/v1/users/profile", keyid="demo-partner-p256"), 403, "mfa_required", before)
    # Logged out on B: nothing accepts it afterwards, on A either; the record names the user
    # logged in through A.
    r = call(b, sid, method="DELETE", path="/apisec/v1/sessions")
    assert r.status_code == 200 and r.json() == {"ended": True}, r.text
    assert [r.get("user") for r in logout_records(p.b)] == ["u-frank"]
    for g, rep in ((p.a, a), (p.b, b)):
        before = upstream(g)
        refused(g, call(rep, sid), 401, "session_invalid", before)


def test_operators_end_sessions_on_every_replica(cluster_pair, secret):  # SES-4, OPS-6
    p = cluster_pair
    a, b = Replica(p, p.a, secret), Replica(p, p.b, secret)
    one, two = new_session(a), new_session(b)
    other_app = new_session(a, app="partner-b")
    # One session, through B's operator listener: refused on A.
    out = operator_end(p.b, "operator-alice", "--session", one)
    assert out.returncode == 0 and json.loads(out.stdout) == {"ended": "one session"}, out.stderr
    before = upstream(p.a)
    refused(p.a, call(a, one), 401, "session_invalid", before)
    # Ending it again finds nothing, on either replica.
    out = operator_end(p.a, "operator-alice", "--session", one)
    assert out.returncode != 0 and "session_invalid" in out.stderr
    # Every session of an app, through A: refused on B; the other app's session lives; a session
    # created right after the end, within the same second, is not affected.
    out = operator_end(p.a, "operator-alice", "--app", "demo-partner")
    fresh = new_session(b)
    assert out.returncode == 0, out.stderr
    before = upstream(p.b)
    rec = refused(p.b, call(b, two), 401, "session_invalid", before)
    assert "operator" in rec["detail"]
    assert call(b, other_app, app="partner-b").status_code == 200
    assert call(a, fresh).status_code == 200
    # Every session of a user, through B, whichever replica the user logged in on.
    s1, s2 = new_session(a), new_session(b)
    assert login(a, s1, "user=u-hank; factors=2").status_code == 200
    assert login(b, s2, "user=u-hank; factors=2").status_code == 200
    out = operator_end(p.b, "operator-alice", "--user", "U-Hank")
    assert out.returncode == 0, out.stderr
    for g, rep, sid in ((p.a, a, s1), (p.b, b, s1), (p.a, a, s2)):
        before = upstream(g)
        refused(g, call(rep, sid, path="/api/v1/users/news"), 401, "session_invalid", before)
    # An operator the policy does not name ends nothing.
    out = operator_end(p.a, "operator-mallory", "--app", "partner-b")
    assert out.returncode != 0 and "operator_not_allowed" in out.stderr
    assert call(b, other_app, app="partner-b").status_code == 200


def test_cluster_sessions_survive_restarts_and_fail_closed_without_the_store(cluster_pair, secret):
    p = cluster_pair
    a = Replica(p, p.a, secret)
    sid = new_session(a)
    # Both replicas restart (a rolling upgrade): the session lives in the store.
    p.restart()
    a, b = Replica(p, p.a, secret), Replica(p, p.b, secret)
    assert call(b, sid).status_code == 200
    # A store that cannot answer: refused 503, neither established nor used unchecked.
    p.store.stop_redis()
    try:
        before = upstream(p.a)
        r = establish(a)
        assert r.status_code == 503 and r.json()["error"] == "state_unavailable", r.text
        assert read_audit(p.a, r.json()["request_id"])["audit"]["code"] == "state_unavailable"
        refused(p.a, call(a, sid), 503, "state_unavailable", before)
    finally:
        p.store.start_redis()
    deadline = time.time() + 10
    while (r := call(a, sid)).status_code == 503:
        assert time.time() < deadline, "service did not resume after the store came back"
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_cluster_eviction_idle_timeout_and_lifetime(tmp_path, secret):  # SES-2
    """At most 2 sessions (slots x entries_per_slot), idle timeout 3 s, absolute lifetime 7 s."""

    doc = session_policy(idle=3, lifetime=7, entries=2)
    doc["sessions"]["max_per_app"] = 2  # this test's one app may fill the store
    p = Pair(tmp_path, secret, doc)
    try:
        a, b = Replica(p, p.a, secret), Replica(p, p.b, secret)
        # The store holds at most two sessions: a third evicts the one idle longest.
        first, second = new_session(a), new_session(b)
        time.sleep(1.1)  # the gateway counts idle time in whole seconds
        assert call(b, first).status_code == 200  # second is now idle longest
        third = new_session(a)
        assert call(b, first).status_code == 200 and call(a, third).status_code == 200
        before = upstream(p.b)
        refused(p.b, call(b, second), 401, "session_invalid", before)
        assert flushed_stat(p.a, "wasmcustom.apisec.sessions_evicted") == 1
        # Used every 2 s, on alternate replicas, a session lives while it is used ...
        idle, kept = new_session(a), new_session(b)
        for _ in range(2):
            time.sleep(2)
            assert call(a, kept).status_code == 200
        before = upstream(p.b)
        rec = refused(p.b, call(b, idle), 401, "session_expired", before)
        assert rec["detail"].startswith("idle for"), rec
        time.sleep(1.8)
        assert call(b, kept).status_code == 200
        # ... until its absolute lifetime, used or not.
        time.sleep(3)
        before = upstream(p.a)
        rec = refused(p.a, call(a, kept), 401, "session_expired", before)
        assert "absolute lifetime" in rec["detail"], rec
    finally:
        p.stop()


def flood_policy() -> dict:
    doc = session_policy(idle=60, lifetime=600, entries=16)
    doc["sessions"].update({"max_per_app": 4, "establish_per_source_per_minute": 45})
    return doc


@pytest.mark.parametrize("backend", ["local", "cluster"])
def test_one_partner_cannot_evict_another_partners_sessions(tmp_path, secret, backend):  # SES-1, SES-4, MON-5
    """Issue 21 item 1: on 91ff9c0, 40 establishes by a second app evicted demo-partner's
    logged-in two-factor session (one Envoy, and across two replicas). Now an app past its cap
    (`max_per_app`) evicts only its own sessions, counted per app in
    apisec_sessions_evicted_total, and establishes are bounded per app and source."""

    if backend == "local":
        g = start_gateway(tmp_path, flood_policy(), secret=secret, concurrency=2)
        victim_side, flood_side, gateways, stop = Client(g, secret), Client(g, secret), [g], g.stop
    else:
    
        p = Pair(tmp_path, secret, flood_policy())
        victim_side, flood_side, gateways, stop = Replica(p, p.a, secret), Replica(p, p.b, secret), [p.a, p.b], p.stop
    try:
        sid = new_session(victim_side)
        assert login(victim_side, sid, "user=u-victim; factors=2").status_code == 200
        if time.time() % 60 > 35:  # the establishes below fall in one of the gateway's minutes
            time.sleep(60.5 - time.time() % 60)
        codes = [establish(flood_side, app="partner-b").status_code for _ in range(40)]
        assert codes == [201] * 40, codes
        # the victim's session is intact
        ok = call(victim_side, sid, path="/api/v1/users/news")
        assert ok.status_code == 200 and ok.json()["headers"]["x-apisec-user"] == "u-victim", \
            (ok.text, read_audit(gateways[0], ok.json().get("request_id", "")) if ok.status_code != 200 else "")
        evicted = sum(metric(g, "apisec_sessions_evicted_total", app="partner-b") for g in gateways)
        assert evicted == 36, evicted
        assert sum(metric(g, "apisec_sessions_evicted_total", app="demo-partner") for g in gateways) == 0
        # past its bound per source, an app's establishes are refused (429, audited, nothing upstream)
        g0 = gateways[-1]
        before = upstream(g0)
        for _ in range(6):  # the 46th this minute from this source
            r = establish(flood_side, app="partner-b")
        assert r.status_code == 429 and r.json()["error"] == "session_rate_limited", r.text
        rec = read_audit(g0, r.json()["request_id"])["audit"]
        assert rec["decision"] == "deny" and rec["app"] == "partner-b"
        assert upstream(g0) == before
        # another app is not affected by it
        assert establish(victim_side).status_code == 201
    finally:
        stop()
