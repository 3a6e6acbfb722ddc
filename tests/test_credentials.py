"""Credentials with a life (issue 26, OPS-2) against a real Envoy loading the built filter: a
credential's `not_before` / `not_after` hold for keys, secrets and bound client certificates,
a rotation with an overlap lets the old and the new key work together and then only the new,
and each credential's end is a labelled gauge the expiry alert reads."""
from __future__ import annotations

import datetime
import json
import time

import pytest

import gateway as gw
from conftest import SECRET_VAR, Client, base_policy, new_secret, prometheus_series, start_gateway
from helpers import RESEARCH, assert_refused, upstream_count, wait_for

DAY = 86400
# The successor secret of the rotation: a variable of its own, in Envoy's environment from its
# start (Envoy reads the environment when it starts; operators.md "Credentials").
NEXT_VAR = "APISEC_DEMO_PARTNER_SECRET_NEXT"


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hmac_credential(keyid: str, **period: float) -> dict:
    return {"id": keyid, "alg": "hmac-sha256", "secret_env": SECRET_VAR,
            **{k: rfc3339(v) for k, v in period.items()}}


def policy(now: float, old_end: float) -> dict:
    doc = base_policy()
    app = next(a for a in doc["apps"] if a["id"] == "demo-partner")
    app["credentials"] += [
        hmac_credential("demo-partner-expired-hmac", not_after=now - 3600),
        hmac_credential("demo-partner-next-year-hmac", not_before=now + 365 * DAY),
        # a rotation: the old secret ends at old_end, the new one began before it
        hmac_credential("demo-partner-old-hmac", not_before=now - 30 * DAY, not_after=old_end),
        {**hmac_credential("demo-partner-new-hmac", not_before=now - 60, not_after=now + 400 * DAY),
         "secret_env": NEXT_VAR},
    ]
    desk = next(a for a in doc["apps"] if a["id"] == "demo-desk")
    desk["credentials"][0]["not_after"] = rfc3339(now - 60)  # the desk's certificate has ended
    return doc


@pytest.fixture(scope="module")
def cgw(tmp_path_factory):
    secret, successor = new_secret(), new_secret()
    now = time.time()
    doc = policy(now, old_end=now + 8)
    g = start_gateway(tmp_path_factory.mktemp("credentials"), doc, secret=secret, concurrency=1,
                      env={NEXT_VAR: successor})
    yield g, Client(g, secret), doc, now + 8, Client(g, successor)
    g.stop()


def get(client: Client, keyid: str):
    return client.send(client.sign("GET", RESEARCH, keyid=keyid))


def test_a_credential_outside_its_period_is_refused(cgw):  # OPS-2, ID-2
    g, client, _, _, _ = cgw
    before = upstream_count(g)
    audit = assert_refused(g, get(client, "demo-partner-expired-hmac"), 401, "credential_expired")
    assert audit["keyid"] == "demo-partner-expired-hmac"
    assert_refused(g, get(client, "demo-partner-next-year-hmac"), 401, "credential_not_yet_valid")
    # a bound client certificate past its end: refused with the same code, on the mTLS listener
    r = client.raw("GET", client.mtls + "/api/v1/accounts/8800123/balance", [("x-app-id", "demo-desk")],
                   cert="client-demo-desk")
    assert_refused(g, r, 401, "credential_expired")
    assert upstream_count(g) == before
    # the app's credentials without a period still work
    assert get(client, "demo-partner-hmac").status_code == 200


def test_rotation_with_an_overlap(cgw):  # OPS-2
    """Both secrets work in the overlap; once the old one's not_after has passed only the new
    one does, with no reload and no restart."""
    g, client, _, old_end, successor = cgw
    assert time.time() < old_end - 1, "the fixture's overlap is still open"
    assert get(client, "demo-partner-old-hmac").status_code == 200
    assert get(successor, "demo-partner-new-hmac").status_code == 200
    # each secret is its own: the old secret under the new keyid does not verify
    assert_refused(g, get(client, "demo-partner-new-hmac"), 401, "signature_invalid")
    time.sleep(max(0.0, old_end + 1.2 - time.time()))
    before = upstream_count(g)
    assert_refused(g, get(client, "demo-partner-old-hmac"), 401, "credential_expired")
    assert upstream_count(g) == before
    assert get(successor, "demo-partner-new-hmac").status_code == 200


def test_each_credentials_end_is_a_gauge_and_a_dropped_one_reads_zero(cgw):  # OPS-2, MON-2
    g, _, doc, old_end, _ = cgw

    def series() -> dict[str, float]:
        return prometheus_series(g.admin("/stats/prometheus"))

    def end(app: str, credential: str) -> float | None:
        return series().get(f'apisec_credential_not_after{{app="{app}",credential="{credential}"}}')

    assert end("demo-partner", "demo-partner-old-hmac") == int(old_end)
    assert end("demo-partner", "demo-partner-hmac") == 0, "no end: 0"
    desk_end = doc["apps"][[a["id"] for a in doc["apps"]].index("demo-desk")]["credentials"][0]["not_after"]
    assert end("demo-desk", "demo-desk-cert") == datetime.datetime.fromisoformat(
        desk_end.replace("Z", "+00:00")).timestamp()
    # the rotation is finished: the old credential leaves the policy, its gauge reads 0 (the
    # expiry alert stops), the new one's stays
    after = json.loads(json.dumps(doc))
    app = next(a for a in after["apps"] if a["id"] == "demo-partner")
    app["credentials"] = [c for c in app["credentials"] if c["id"] != "demo-partner-old-hmac"]
    gw.apply_policy(json.dumps(after), g.layout, actor="test", source="test")
    wait_for(lambda: end("demo-partner", "demo-partner-old-hmac") == 0, what="the dropped credential's gauge")
    assert end("demo-partner", "demo-partner-new-hmac") > time.time() + 399 * DAY


def test_an_hmac_secret_enters_by_hot_restart_with_no_request_lost(tmp_path, secret):  # OPS-2
    """An HMAC secret reaches the filter only through Envoy's environment, which a running
    Envoy never rereads. The restart-free path for the partners is Envoy's hot restart: a new
    Envoy (restart epoch 1, the new secret in its environment) takes the listening sockets over
    from the running one, which drains and exits. The policy that names the new secret is
    written first: the running Envoy refuses it (its variable is not set there) and keeps the
    last good one; the new Envoy loads it. Calls keep flowing throughout, none refused or
    dropped, and afterwards both secrets work (operators.md "Credentials: validity and rotation")."""
    import subprocess
    import threading

    successor = new_secret()
    doc = base_policy()
    g = start_gateway(tmp_path / "gw", doc, secret=secret, concurrency=1)
    client, next_client = Client(g, secret), Client(g, successor)
    statuses: list[int] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                statuses.append(get(client, "demo-partner-hmac").status_code)
            except Exception as e:  # a dropped connection is a failure too
                statuses.append(repr(e))  # type: ignore[arg-type]

    epoch1 = None
    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        # the rotated policy: the successor names a variable the running Envoy does not have
        rotated = json.loads(json.dumps(doc))
        app = next(a for a in rotated["apps"] if a["id"] == "demo-partner")
        app["credentials"].append({**hmac_credential("demo-partner-next-hmac", not_before=time.time() - 60),
                                   "secret_env": NEXT_VAR})
        gw.write_ecds(json.dumps(rotated), g.layout)
        wait_for(lambda: "policy refused" in g.log_tail(200), what="the running Envoy refusing the policy")
        assert_refused(g, get(next_client, "demo-partner-next-hmac"), 401, "unknown_key")
        # epoch 1: the same configuration, both secrets in its environment
        args = g.envoy.args + ["--restart-epoch", "1", "--parent-shutdown-time-s", "4", "--drain-time-s", "2"]
        env = {**g.env, NEXT_VAR: successor}
        epoch1 = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(g.envoy_log, "a"))
        g.envoy.wait(timeout=60)  # the parent drained and left
        wait_for(lambda: get(next_client, "demo-partner-next-hmac").status_code == 200, timeout=30,
                 what="the successor secret working")
        time.sleep(1)
    finally:
        stop.set()
        worker.join(timeout=30)
        if epoch1 is not None:
            g.envoy = epoch1  # stopped with the gateway
        g.stop()
    assert len(statuses) > 20 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
