"""Policy hot reload through ECDS (bad policy refused, last good one kept; a level change takes
effect at once: LVL-4), fail-closed behaviour when the filter cannot run, and the replay store's
capacity bound (ATK-1) in a real Envoy."""
from __future__ import annotations

import copy
import json
import os
import pwd
import subprocess

import pytest
from conftest import CLI, ROOT, Client, base_policy, gw, new_secret, read_audit, start_gateway
from helpers import assert_refused, ecds_stats, wait_for


def push_raw(g: gw.Gateway, policy_text: str) -> None:
    """What an operator's mistake looks like on disk: a config that skipped `apisec policy check`."""
    gw.write_ecds(policy_text, g.layout)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    secret = new_secret()
    g = start_gateway(tmp_path_factory.mktemp("reload"), base_policy(), secret=secret)
    yield g, Client(g, secret)
    g.stop()


def quote_status(client: Client) -> int:
    return client.get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"}).status_code


BAD_POLICIES = {
    "not json": lambda doc: "{not json",
    "unknown field": lambda doc: json.dumps({**doc, "gatewya": {}}),
    "unknown level": lambda doc: json.dumps({**doc, "apis": [{**doc["apis"][0], "level": "S9"}] + doc["apis"][1:]}),
    "empty inventory": lambda doc: json.dumps({**doc, "apis": []}),
    "secret not in gateway env": lambda doc: json.dumps(
        {**doc, "apps": [{"id": "x", "credentials": [{"id": "x-h", "alg": "hmac-sha256", "secret_env": "APISEC_NOT_SET"}]}]}
    ),
    "overlapping APIs": lambda doc: json.dumps({**doc, "apis": doc["apis"] + [{**doc["apis"][0], "id": "dup"}]}),
    "S3 grant without approval": lambda doc: json.dumps(
        {**doc, "grants": doc["grants"] + [{"id": "no-approval", "app": "demo-partner", "apis": ["trade.order.place"]}]}
    ),
}


@pytest.mark.parametrize("name", list(BAD_POLICIES))
def test_bad_policy_refused_and_last_good_stays(own, name):
    g, client = own
    good = base_policy()
    signed = client.sign("GET", "/api/v1/info/research/r-keep")
    assert quote_status(client) == 200
    before = ecds_stats(g)
    push_raw(g, BAD_POLICIES[name](copy.deepcopy(good)))
    wait_for(lambda: ecds_stats(g).get("config_fail", 0) + ecds_stats(g).get("update_rejected", 0)
             > before.get("config_fail", 0) + before.get("update_rejected", 0), what="the bad policy to be refused")
    assert ecds_stats(g)["update_success"] == before["update_success"], "a bad policy must not be swapped in"
    # The last good policy is still enforced, in full.
    assert quote_status(client) == 200
    assert client.send(signed).status_code == 200
    assert_refused(g, client.get("/api/v1/info/research/r-x", headers={"x-app-id": "demo-partner"}, tls=True), 401, "signature_missing")
    assert "policy refused" in g.envoy_log.read_text()


def test_level_change_takes_effect_without_restart_and_replay_state_survives(own):  # LVL-4, ATK-1
    g, client = own
    used = client.sign("GET", "/api/v1/info/research/r-used")
    assert client.send(used).status_code == 200
    pid = g.envoy.pid
    raised = base_policy()
    for api in raised["apis"]:
        if api["id"] == "market.quote":
            api["level"] = "S1"
            # OPS-1, LVL-4: a level change carries its own review; the one in force does not do
            unreviewed = json.loads(json.dumps(raised))
            api["review"] = {"by": "bob", "ticket": "ARB-2026-0500", "date": "2026-12-06"}
    with pytest.raises(gw.PolicyRejected) as refused:
        gw.apply_policy(json.dumps(unreviewed), g.layout, actor="bob", source="test")
    assert "market.quote" in str(refused.value) and "review" in str(refused.value)
    rejected = json.loads(g.layout.ops_log.read_text().splitlines()[-1])
    assert rejected["outcome"] == "rejected" and "S0 -> S1" in rejected["reason"]
    # S1 needs a grant (PERM-2): the operator raises the level and grants the partner together.
    raised["grants"].append({"id": "quote-after-raise", "app": "demo-partner", "apis": ["market.quote"]})
    before = ecds_stats(g)["update_success"]
    gw.apply_policy(json.dumps(raised), g.layout, actor="bob", source="test")
    wait_for(lambda: ecds_stats(g)["update_success"] > before, what="the new policy to load")
    # LVL-4: the change is logged with who, when, before and after
    last = json.loads(g.layout.ops_log.read_text().splitlines()[-1])
    quote = next(c for c in last["changes"] if c.get("id") == "market.quote")
    assert last["actor"] == "bob" and quote["fields"]["level"] == {"before": "S0", "after": "S1"}
    assert g.envoy.pid == pid and g.envoy.poll() is None, "no restart"
    r = client.get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"}, tls=True)
    assert_refused(g, r, 401, "signature_missing")
    signed = client.sign("GET", "/api/v1/market/quotes/600000")
    r = client.send(signed)
    assert r.status_code == 200 and r.json()["headers"]["x-apisec-level"] == "S1"
    # Nonces accepted before the reload are still remembered after it (shared data survives).
    assert_refused(g, client.send(used), 401, "nonce_replayed")
    # And back down again.
    gw.write_ecds(json.dumps(base_policy()), g.layout)
    wait_for(lambda: ecds_stats(g)["update_success"] > before + 1, what="the policy to load again")
    assert quote_status(client) == 200


def test_gateway_without_a_valid_policy_refuses_everything(tmp_path):
    """The HMAC secret the policy names is not in Envoy's environment: the filter refuses its
    only configuration, so no request is passed upstream."""
    g = start_gateway(tmp_path, base_policy(), secret=None, with_tls=False)
    try:
        client = Client(g, "")
        wait_for(lambda: ecds_stats(g).get("config_fail", 0) + ecds_stats(g).get("update_rejected", 0) > 0,
                 what="the policy to be refused")
        for path in ("/api/v1/market/quotes/1", "/anything"):
            r = client.get(path, headers={"x-app-id": "demo-partner"})
            assert r.status_code >= 500, r.text
        assert g.stat("cluster.backend.upstream_rq_total") == 0
        assert "APISEC_DEMO_PARTNER_SECRET is not set" in g.envoy_log.read_text()
    finally:
        g.stop()


def test_crashed_filter_fails_closed(tmp_path):
    """A filter VM that traps (any fault) must refuse, never pass: failure_policy FAIL_CLOSED."""
    crash = ROOT / "target/wasm32-wasip1/release/apisec_crash_fixture.wasm"
    assert crash.exists(), "built by `make e2e`"
    g = start_gateway(tmp_path, base_policy(), secret=new_secret(), with_tls=False, wasm=crash, concurrency=1)
    try:
        client = Client(g, "")
        statuses = [client.get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"}).status_code for _ in range(3)]
        assert all(s == 503 for s in statuses), statuses
        assert g.stat("cluster.backend.upstream_rq_total") == 0
        wasm_cfg = json.loads((g.layout.ecds_dir / gw.ECDS_FILE).read_text())["resources"][0]["typed_config"]["config"]
        assert wasm_cfg["failure_policy"] == "FAIL_CLOSED"
    finally:
        g.stop()


def test_a_worker_without_a_wasm_vm_refuses_everything(tmp_path):  # LVL-1, ATK-1
    """Issue 21 item 0: Envoy under `ulimit -v 24 GiB` creates the main thread's VM (the policy
    loads) but not the worker's; Envoy then runs that worker's streams as if the filter were
    absent, FAIL_CLOSED or not. The guard after apisec (RBAC on the filter state only apisec
    sets) refuses them: 503 apisec_unavailable, Envoy's own audit line, nothing upstream, the
    guard's counter up, and the readiness path answers 503 on that worker."""
    g = start_gateway(tmp_path, base_policy(), secret=new_secret(), with_tls=False, concurrency=1,
                      memory_limit=24 * 1024 ** 3)
    try:
        # the situation of the report: the worker has no VM, /ready still says LIVE
        wait_for(lambda: "Failed to create new Wasm instance" in g.envoy_log.read_text(), what="the worker's VM failure")
        assert g.admin("/ready").strip() == "LIVE"
        client = Client(g, "")
        before = g.stat("cluster.backend.upstream_rq_total")
        r = client.session.post(client.http + "/api/v1/orders", data=b'{"symbol":"600000"}',
                                headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "apisec_unavailable"
        rid = r.json()["request_id"]
        assert client.get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"}).status_code == 503
        assert g.stat("cluster.backend.upstream_rq_total") == before, "the upstream received a request"
        rec = read_audit(g, rid)
        assert rec["source"] == "envoy" and rec["status"] == 503
        assert rec["details"].startswith("rbac_access_denied")
        assert g.stat("http.http.rbac.denied") >= 2
        ready = client.get("/apisec/v1/ready")
        assert ready.status_code == 503 and ready.json()["error"] == "apisec_unavailable"
    finally:
        g.stop()


def test_readiness_path_answers_from_a_worker_running_apisec(own):  # LVL-1
    g, client = own
    before = g.stat("cluster.backend.upstream_rq_total")
    r = client.get("/apisec/v1/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    assert g.stat("cluster.backend.upstream_rq_total") == before
    # the guard lets what apisec allowed through: S0 reaches the backend
    assert quote_status(client) == 200
    assert g.stat("http.http.rbac.denied") == 0


def test_replay_store_full_refuses_instead_of_forgetting(tmp_path):
    """A tiny replay store (2 slots x 8 entries): once it is full of live nonces, new requests are
    refused with 503 replay_store_full; nothing is evicted early, so no replay can slip through."""
    policy = base_policy()
    policy["gateway"]["replay"] = {"slots": 2, "entries_per_slot": 8}
    secret = new_secret()
    g = start_gateway(tmp_path, policy, secret=secret)
    try:
        client = Client(g, secret)
        # One app may hold half of each slot (app_entries_per_slot defaults to 4 here), so the
        # app's share of the store is 8 nonces. Nonces land in slots by a keyed hash under the
        # store's random salt: with 24 requests a slot got 3 or fewer about once in 3,600 runs
        # (seen once: 7 accepted); with 48, about once in 10^10.
        sent = [client.sign("GET", f"/api/v1/info/research/flood-{i}") for i in range(48)]
        results = [client.send(s) for s in sent]
        ok = [r for r in results if r.status_code == 200]
        full = [r for r in results if r.status_code == 503]
        assert len(ok) == 8, [r.status_code for r in results]
        assert len(ok) + len(full) == 48
        assert_refused(g, full[0], 503, "replay_store_full")
        # every accepted request is still refused as a replay: none was forgotten
        for s, r in zip(sent, results):
            if r.status_code == 200:
                assert client.send(s).json()["error"] == "nonce_replayed"
    finally:
        g.stop()


def test_policy_apply_reports_what_envoy_did(tmp_path, monkeypatch):  # LVL-4, LOG-5
    """`apisec policy apply` waits for Envoy's answer: a policy Envoy takes is logged `applied`;
    one the filter refuses (here: a replay layout the running store cannot take) is logged
    `rejected` by Envoy, exits non-zero and leaves the last good policy in force and as the base
    of the next comparison; an invalid one is refused before anything is written and logged
    `rejected` by apisec with the reason. The log is chained under APISEC_OPS_KEY: `apisec audit
    verify` finds it intact, and finds an edited record at its line."""
    ops_key = new_secret()
    monkeypatch.setenv("APISEC_OPS_KEY", ops_key)
    g = start_gateway(tmp_path, base_policy(), secret=new_secret())
    try:
        ops = g.layout.ops_log
        ecds = g.layout.ecds_dir / gw.ECDS_FILE
        doc = base_policy()
        doc["opted_out_users"] = ["u-9"]
        record = gw.apply_policy(json.dumps(doc), g.layout, actor="carol", source="test")
        assert record["outcome"] == "applied" and record["actor"] == "carol"
        # who, as the operating system knows it, beside the declared name
        assert record["operator"]["declared"] == "carol" and record["operator"]["uid"] == os.getuid()
        assert record["operator"]["user"] == pwd.getpwuid(os.getuid()).pw_name
        assert record["seq"] >= 1 and len(record["mac"]) == 64
        assert {"section": "opted_out_users", "change": "changed", "before": [], "after": ["u-9"]} in record["changes"]
        good_file = ecds.read_text()
        bad = json.loads(json.dumps(doc))
        bad["gateway"]["replay"] = {"slots": 7}
        with pytest.raises(gw.PolicyRejected, match="rejected"):
            gw.apply_policy(json.dumps(bad), g.layout, actor="carol", source="test")
        last = json.loads(ops.read_text().splitlines()[-1])
        assert last["outcome"] == "rejected" and last["ecds_restored"] and last["rejected_by"] == "envoy"
        # Envoy's own reason, read from its log (issue 21 item 12), not a pointer to it
        assert "replay" in last["reason"] and "its log says why" not in last["reason"], last["reason"]
        assert ecds.read_text() == good_file, "a restart must not load the refused policy"
        assert json.loads((g.layout.ecds_dir / "applied-policy.json").read_text())["opted_out_users"] == ["u-9"]
        before = ecds.read_text()
        logged = len(ops.read_text().splitlines())
        invalid = json.loads(json.dumps(doc))
        invalid["apis"][0]["level"] = "S9"
        with pytest.raises(gw.PolicyRejected, match="level"):
            gw.apply_policy(json.dumps(invalid), g.layout, actor="carol", source="test")
        assert ecds.read_text() == before, "an invalid policy is never written"
        lines = ops.read_text().splitlines()
        assert len(lines) == logged + 1, "the refusal is logged"
        last = json.loads(lines[-1])
        assert (last["outcome"], last["rejected_by"], last["actor"]) == ("rejected", "apisec", "carol")
        assert "level" in last["reason"] and "changes" not in last
        # Issue 21 item 12: without the key, nothing is applied and no unsealed line joins the
        # sealed log (on 91ff9c0 it was written, and the log verified NOT intact for good)
        monkeypatch.delenv("APISEC_OPS_KEY")
        other = json.loads(json.dumps(doc))
        other["opted_out_users"] = ["u-9", "u-10"]
        with pytest.raises(gw.PolicyRejected, match="sealed"):
            gw.apply_policy(json.dumps(other), g.layout, actor="carol", source="test")
        assert ops.read_text().splitlines() == lines and ecds.read_text() == before
        monkeypatch.setenv("APISEC_OPS_KEY", ops_key)
        with pytest.raises(gw.PolicyRejected, match="actor"):
            gw.apply_policy(json.dumps(other), g.layout, actor="", source="test")
        # --dry-run shows the changes and writes nothing
        (tmp_path / "other.json").write_text(json.dumps(other))
        out = subprocess.run([str(CLI), "policy", "apply", str(tmp_path / "other.json"), "--ecds", str(ecds),
                              "--dry-run"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "opted_out_users" in out.stdout and "dry run" in out.stdout, out
        assert ops.read_text().splitlines() == lines and ecds.read_text() == before
        # LOG-5: the operations log is one chain across the three runs, checked like the audit log
        verify = [str(CLI), "audit", "verify", str(ops), "--key-env", "APISEC_OPS_KEY", "--format", "json",
                  "--no-checkpoints"]
        out = subprocess.run(verify, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        edited = tmp_path / "operations-edited.log"
        edited.write_text(ops.read_text().replace('"declared":"carol"', '"declared":"mallory"', 1))
        out = subprocess.run([*verify[:3], str(edited), *verify[4:]], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        findings = json.loads(out.stdout)["findings"]
        first_carol = next(i for i, l in enumerate(lines, 1) if '"declared":"carol"' in l)
        assert (findings[0]["kind"], findings[0]["line"]) == ("modified", first_carol), findings
    finally:
        g.stop()
