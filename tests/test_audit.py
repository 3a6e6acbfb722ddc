"""Audit evidence (issue 13; LOG-1, LOG-4) against a real Envoy with two workers: one JSON object
per request in the access log, allowed and refused alike (no string inside a string), with what
only the ended stream tells (status, duration, bytes, upstream); every record sealed into its
worker's chain; `apisec audit verify` finds a modified, deleted, inserted or reordered record at
its line, and a tail cut off against the checkpoints the gateway wrote to Envoy's log."""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import subprocess
import time

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import (AUDIT_KEY, AUDIT_KEY_VAR, CLI, ROOT, Client, audit_lines, base_policy, gw, new_secret, read_audit,
                      start_gateway)

RESEARCH = "/api/v1/info/research/r-2026-001"  # S1, signed


@pytest.fixture(scope="module")
def agw(tmp_path_factory, secret):
    doc = base_policy()
    doc["audit"]["checkpoint_seconds"] = 1
    g = start_gateway(tmp_path_factory.mktemp("gw-audit"), doc, secret=secret, concurrency=2)
    yield g
    g.stop()


def verify(g, *files, key: str = AUDIT_KEY, checkpoints: bool = True, extra=()) -> tuple[int, dict]:
    args = [str(CLI), "audit", "verify", *map(str, files), "--key-env", AUDIT_KEY_VAR, "--format", "json", *extra]
    if checkpoints:
        args += ["--checkpoints", str(g.envoy_log)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, AUDIT_KEY_VAR: key})
    assert out.returncode in (0, 1, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_each_request_is_one_json_object_with_what_envoy_did(agw, secret):  # LOG-1
    c = Client(agw, secret)
    signed = c.sign("GET", RESEARCH)
    t0 = time.time()
    ok = c.send(signed)
    elapsed_ms = (time.time() - t0) * 1000
    assert ok.status_code == 200
    request_id = ok.json()["headers"]["x-request-id"]  # the transaction serial, forwarded upstream
    rec = read_audit(agw, request_id)["audit"]
    # when (LOG-1): the gateway's clock, in Unix seconds, within the request's time
    assert int(t0) - 1 <= rec["ts"] <= int(t0 + elapsed_ms / 1000) + 1, (rec["ts"], t0)
    # how long: the filter's own measure lies within what the client saw
    assert 0 <= rec["duration_ms"] <= elapsed_ms + 5, (rec["duration_ms"], elapsed_ms)
    assert (rec["app"], rec["api"], rec["level"], rec["function"]) == ("demo-partner", "info.research", "S1",
                                                                       "licensed_info")
    assert rec["decision"] == "allow" and rec["grant"] == "demo-partner-info" and rec["status"] == 200
    assert rec["upstream"] == f"127.0.0.1:{agw.layout.upstream_port}"
    # Body bytes, as they passed the filter: none in, the upstream's answer out.
    assert rec["bytes_in"] == 0 and rec["bytes_out"] == len(ok.content)
    assert rec["client_ip"] == "127.0.0.1" and rec["method"] == "GET" and rec["path"] == RESEARCH
    assert len(rec["mac"]) == 64 and rec["seq"] >= 1 and rec["chain"] and rec["key"]
    refused = c.get(RESEARCH, headers={"x-app-id": "nobody"}, tls=True)
    assert refused.status_code == 401
    rec = read_audit(agw, refused.json()["request_id"])["audit"]
    assert rec["decision"] == "deny" and rec["code"] == "unknown_app" and rec["status"] == 401
    assert rec["upstream"] is None and rec["bytes_out"] == len(refused.content) and len(rec["mac"]) == 64
    # A signed body, held and verified before it went on: its bytes in.
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    order = c.send(c.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256"))
    assert order.status_code == 200, order.text
    rec = read_audit(agw, order.json()["headers"]["x-request-id"])["audit"]
    assert rec["bytes_in"] == len(body) and rec["bytes_out"] == len(order.content) and rec["level"] == "S3"
    # The line is the record itself: a log pipeline reads it without decoding a string inside it.
    line = next(l for l in agw.layout.audit_log.read_text().splitlines() if refused.json()["request_id"] in l)
    assert json.loads(line)["code"] == "unknown_app"


def traffic(g, secret, n: int) -> list[str]:
    """n requests from many connections at once, so that both workers write: signed S1 calls and
    refusals. Returns their request ids."""
    c = Client(g, secret)

    def one(i: int) -> str:
        if i % 3 == 0:
            r = c.raw("GET", f"{c.https}{RESEARCH}", [("x-app-id", "nobody")])
            return r.json()["request_id"]
        signed = c.sign("GET", RESEARCH)
        r = c.send(signed)
        assert r.status_code == 200, r.text
        return r.json()["headers"]["x-request-id"]

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, range(n)))


def settled(g, ids: list[str]) -> list[str]:
    """The audit log once every one of these requests is in it and each worker's checkpoint
    vouches for its chain's last record."""
    deadline = time.time() + 20
    while True:
        lines = g.layout.audit_log.read_text().splitlines()
        have = {json.loads(l).get("request_id") for l in lines}
        heads: dict[str, int] = {}
        for l in lines:
            rec = json.loads(l)
            if "chain" in rec:
                heads[rec["chain"]] = max(heads.get(rec["chain"], 0), rec["seq"])
        log = g.envoy_log.read_text(errors="replace")
        vouched = all(f'"chain":"{ch}","seq":{seq},' in log for ch, seq in heads.items())
        if set(ids) <= have and vouched:
            return lines
        assert time.time() < deadline, "records or checkpoints did not arrive"
        time.sleep(0.3)


def write(tmp_path, name: str, lines: list[str]):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def by_chain(lines: list[str]) -> dict[str, list[int]]:
    """Line indexes of each chain's records, in file order."""
    out: dict[str, list[int]] = {}
    for i, l in enumerate(lines):
        rec = json.loads(l)
        if "chain" in rec:
            out.setdefault(rec["chain"], []).append(i)
    return out


def first(report: dict) -> tuple[str, int]:
    f = report["findings"][0]
    return f["kind"], f["line"]


def test_two_workers_chains_verify_and_every_tampering_is_found(agw, secret, tmp_path):  # LOG-1
    lines = settled(agw, traffic(agw, secret, 60))
    rc, rep = verify(agw, agw.layout.audit_log)
    assert rc == 0 and rep["findings"] == [], rep
    assert rep["chains"] >= 2, "both workers write, each its own chain"
    assert rep["records"] == len(lines) and rep["checkpoints"] >= rep["chains"]
    chains = by_chain(lines)
    chain, idx = max(chains.items(), key=lambda kv: len(kv[1]))
    assert len(idx) >= 6
    mid, nxt = idx[len(idx) // 2], idx[len(idx) // 2 + 1]

    # Modified: one field of one record.
    m = list(lines)
    rec = json.loads(m[mid])
    assert '"status":' in m[mid]
    m[mid] = m[mid].replace(f'"status":{rec["status"]}', f'"status":{rec["status"] + 1}', 1)
    rc, rep = verify(agw, write(tmp_path, "modified.log", m))
    assert rc == 1 and first(rep) == ("modified", mid + 1), rep

    # Deleted: the next record of its chain says what is missing.
    d = lines[:mid] + lines[mid + 1:]
    rc, rep = verify(agw, write(tmp_path, "deleted.log", d))
    assert rc == 1 and first(rep) == ("deleted", nxt), rep  # nxt shifted up by one: nxt + 1 - 1

    # Inserted: a copy of an earlier record, further down.
    i = lines + [lines[mid]]
    rc, rep = verify(agw, write(tmp_path, "inserted.log", i))
    assert rc == 1 and first(rep) == ("inserted", len(i)), rep

    # Reordered: two records of one chain swap places.
    r = list(lines)
    r[mid], r[nxt] = r[nxt], r[mid]
    rc, rep = verify(agw, write(tmp_path, "reordered.log", r))
    assert rc == 1 and [f["kind"] for f in rep["findings"]] == ["reordered"], rep
    assert rep["findings"][0]["line"] == nxt + 1

    # Truncated: the last records cut off; the checkpoints in Envoy's log vouch for them.
    t = lines[:-5]
    rc, rep = verify(agw, write(tmp_path, "truncated.log", t))
    assert rc == 1 and {f["kind"] for f in rep["findings"]} == {"truncated"}, rep
    assert all(f["file"] == str(agw.envoy_log) for f in rep["findings"])
    # Without Envoy's log a cut tail cannot be seen: never "intact" (issue 21 item 7: exit 0 on
    # 91ff9c0), unless the operator says so on purpose
    rc, rep = verify(agw, write(tmp_path, "truncated.log", t), checkpoints=False)
    assert rc == 3 and rep["findings"] == [] and "checkpoints" in rep["unverified"], rep
    rc, _ = verify(agw, write(tmp_path, "truncated.log", t), checkpoints=False, extra=["--no-checkpoints"])
    assert rc == 0

    # Issue 21 item 7: a forged line shaped like Envoy's own record passed as intact on 91ff9c0
    forged = '{"source":"envoy","status":200,"client":"10.0.0.9","request_id":"forged","upstream":"127.0.0.1:1"}'
    f = lines[:mid] + [forged] + lines[mid:]
    rc, rep = verify(agw, write(tmp_path, "forged.log", f))
    assert rc == 1 and first(rep) == ("unchained", mid + 1), rep
    rc, rep = verify(agw, write(tmp_path, "forged.log", f), extra=["--allow-unchained"])
    assert rc == 0 and rep["unchained"] == 1
    # the gateway's own audit log holds chained records only; Envoy's records are elsewhere
    assert all('"source":"envoy"' not in line for line in agw.layout.audit_log.read_text().splitlines())

    # Another key: nothing verifies.
    rc, rep = verify(agw, agw.layout.audit_log, key=new_secret())
    assert rc == 1 and {f["kind"] for f in rep["findings"]} == {"unknown_key"}


def test_without_a_chain_key_records_are_plain_and_compliance_says_so(tmp_path, secret):  # LOG-1
    doc = base_policy()
    del doc["audit"]
    g = start_gateway(tmp_path / "gw", doc, secret=secret, concurrency=1)
    try:
        c = Client(g, secret)
        r = c.send(c.sign("GET", RESEARCH))
        rec = read_audit(g, r.json()["headers"]["x-request-id"])["audit"]
        assert rec["decision"] == "allow" and "mac" not in rec and "chain" not in rec
    finally:
        g.stop()
    (tmp_path / "p.json").write_text(json.dumps(doc))
    out = subprocess.run([str(CLI), "compliance", str(tmp_path / "p.json"), "--format", "json"], capture_output=True,
                         text=True, timeout=60)
    findings = {f["control"]: f for f in json.loads(out.stdout)["findings"]}
    assert out.returncode == 1 and findings["audit_chain"]["status"] == "not_met"
    assert findings["audit_chain"]["ids"] == "LOG-1"


def test_a_bad_chain_key_refuses_the_policy(tmp_path, secret):  # fail closed
    """A chain key too short to be one: the filter refuses the policy, and with no policy in
    force every request is refused (FAIL_CLOSED); the reason is in Envoy's log, the key is not."""
    g = start_gateway(tmp_path / "gw", base_policy(), secret=secret, concurrency=1, env={AUDIT_KEY_VAR: "c2hvcnQ="})
    try:
        r = Client(g, secret).get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"})
        assert r.status_code >= 500, r.text
        assert g.stat("cluster.backend.upstream_rq_total") == 0
        log = g.envoy_log.read_text()
        assert "audit.chain_key_env" in log and "a chain key needs at least 32" in log and "c2hvcnQ=" not in log
    finally:
        g.stop()


# --- masking (LOG-4) -------------------------------------------------------------------------------

ID_CARD, MOBILE, BANK_CARD = "110101199003071234", "13800138000", "6222021234567890128"


def test_personal_data_is_masked_wherever_it_is_logged(agw, secret):  # LOG-4
    c = Client(agw, secret)
    # In a path and a query string (an unknown API: refused, and recorded).
    r = c.get(f"/api/v1/lookup/{ID_CARD}?mobile={MOBILE}&card={BANK_CARD}&account_id=8800123456&page=2",
              headers={"x-app-id": "demo-partner"})
    assert r.json()["error"] == "unknown_api", r.text
    rec = read_audit(agw, r.json()["request_id"])["audit"]
    assert rec["path"] == "/api/v1/lookup/110***********1234", rec
    assert rec["query"] == "mobile=138****8000&card=622************0128&account_id=880***3456&page=2", rec
    # Issue 21 item 8: the same numbers written with separators (in clear on 91ff9c0).
    r = c.get("/api/v1/lookup/6222-0212-3456-7894?m=138-0013-8000&n=%2B86-138-0013-8000"
              "&c=6222+0212+3456+7894&d=6222%200212%203456%207894&e=138%2D0013%2D8000",
              headers={"x-app-id": "demo-partner"})
    assert r.json()["error"] == "unknown_api", r.text
    rec = read_audit(agw, r.json()["request_id"])["audit"]
    assert rec["path"] == "/api/v1/lookup/622*-****-****-7894", rec
    assert rec["query"] == ("m=138-****-8000&n=%2B86-138-****-8000&c=622*+****+****+7894"
                            "&d=622*%20****%20****%207894&e=138-****-8000"), rec  # Envoy decoded %2D
    # An account field named by the policy, in the path of the API whose template names it.
    r = c.session.get(f"{c.mtls}/api/v1/accounts/8800123456/balance", headers={"x-app-id": "demo-partner"},
                      cert=(str(agw.layout.certs / "client-demo-partner.pem"),
                            str(agw.layout.certs / "client-demo-partner.key")), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/api/v1/accounts/8800123456/balance", "the backend gets the real path"
    rec = read_audit(agw, r.json()["headers"]["x-request-id"])["audit"]
    assert rec["path"] == "/api/v1/accounts/880***3456/balance" and rec["api"] == "account.balance", rec
    # A user named by a mobile number, and a refusal detail that quotes one.
    signed = c.sign("GET", RESEARCH, extra=["--header", f"x-user-id: {MOBILE}", "--cover", "x-user-id"])
    r = c.send(signed)
    assert r.status_code == 200, r.text
    rec = read_audit(agw, r.json()["headers"]["x-request-id"])["audit"]
    assert rec["user"] == "138****8000", rec
    r = c.get("/api/v1/market/quotes/600000", headers={"x-app-id": MOBILE})
    assert r.json()["error"] == "unknown_app"
    rec = read_audit(agw, r.json()["request_id"])["audit"]
    assert "138****8000" in rec["detail"], rec
    # None of it anywhere in the log, and the chain still verifies.
    time.sleep(1.5)
    text = agw.layout.audit_log.read_text()
    for secret_value in (ID_CARD, MOBILE, BANK_CARD, "8800123456"):
        assert secret_value not in text, secret_value
    rc, rep = verify(agw, agw.layout.audit_log)
    assert rc == 0, rep


def evidence_verify(*files, keyring=None, policy=None, chain: bool = False) -> tuple[int, dict]:
    args = [str(CLI), "audit", "verify", *map(str, files), "--evidence", "--format", "json"]
    if keyring:
        args += ["--keyring", str(keyring)]
    if policy:
        args += ["--policy", str(policy)]
    if chain:
        args += ["--key-env", AUDIT_KEY_VAR]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, AUDIT_KEY_VAR: AUDIT_KEY})
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_s3_evidence_reverified_after_key_rotation_and_forgery_found(agw, secret, tmp_path):  # DATA-4
    """An S3 order's record keeps its signature evidence and the key's fingerprint. After the
    partner's key is rotated out, `apisec audit verify --evidence` still re-verifies it against
    the keyring `apisec policy apply` keeps (retired keys included); against the current policy
    alone the key is unknown; an order whose evidence was rewritten (another quantity, with its
    digest and hash recomputed, as an insider would) does not verify."""
    c = Client(agw, secret)
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    order = c.send(c.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256"))
    assert order.status_code == 200, order.text
    rid = order.json()["headers"]["x-request-id"]
    ev = read_audit(agw, rid)["audit"]["evidence"]
    der = serialization.load_pem_public_key((ROOT / "policies/demo-keys/demo-partner.pub.pem").read_bytes()) \
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ev["key_sha256"] == hashlib.sha256(der).hexdigest() and ev["keyid"] == "demo-partner-p256"
    assert f'"content-digest": {ev["content_digest"]}' in ev["signature_base"]

    keyring = agw.layout.ecds_dir / "public-keys.jsonl"
    subprocess.run([str(CLI), "keygen", "p256", "--out", str(tmp_path / "rotated")], check=True, capture_output=True)
    rotated = base_policy()
    rotated["audit"]["checkpoint_seconds"] = 1
    for app in rotated["apps"]:
        for cred in app.get("credentials", []):
            if cred["id"] == "demo-partner-p256":
                cred["public_key_pem"] = (tmp_path / "rotated.pub.pem").read_text()
    (tmp_path / "rotated.json").write_text(json.dumps(rotated))
    try:
        record = gw.apply_policy(json.dumps(rotated), agw.layout, actor="ops", source="rotation")
        assert record["outcome"] == "applied" and record["keyring_added"] == 1
        cred_change = next(ch for ch in record["changes"] if ch.get("id") == "demo-partner")
        assert cred_change["fields"]["credentials"] == {"issued": [], "revoked": [], "rotated": ["demo-partner-p256"]}
        # the old key signs no more
        late = c.send(c.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256"))
        assert late.status_code == 401 and late.json()["error"] == "signature_invalid"

        log = agw.layout.audit_log
        lines = log.read_text().splitlines()
        at = next(i for i, l in enumerate(lines, 1) if rid in l)
        rc, rep = evidence_verify(log, keyring=keyring)
        assert rc == 0, rep["findings"]
        assert rep["evidence_checked"] == rep["evidence_verified"] >= 1
        rc, rep = evidence_verify(log, policy=tmp_path / "rotated.json")
        assert rc == 1 and ("evidence_key_unknown", at) in [(f["kind"], f["line"]) for f in rep["findings"]]

        # An insider rewrites the order: 100 becomes 900, digest and hash recomputed to agree.
        rec = json.loads(lines[at - 1])
        # a base logged as it was signed is not hashed again (the record's base is the signed one)
        assert "signature_base_sha256" not in rec["evidence"], rec["evidence"]
        forged_body = body.replace(b"100", b"900")
        digest = "sha-256=:" + base64.b64encode(hashlib.sha256(forged_body).digest()).decode() + ":"
        e = rec["evidence"]
        e["signature_base"] = e["signature_base"].replace(e["content_digest"], digest)
        e["content_digest"] = digest
        e["signature_base_sha256"] = base64.b64encode(hashlib.sha256(e["signature_base"].encode()).digest()).decode()
        forged = write(tmp_path, "forged.log", [*lines[:at - 1], json.dumps(rec, separators=(",", ":")), *lines[at:]])
        rc, rep = evidence_verify(forged, keyring=keyring)
        assert rc == 1 and [(f["kind"], f["line"]) for f in rep["findings"]] == [("evidence_invalid", at)], rep
        assert "does not verify" in rep["findings"][0]["detail"]
        # without the chain key the evidence alone finds it; with it, the chain does as well
        rc, rep = evidence_verify(forged, keyring=keyring, chain=True)
        assert {("modified", at), ("evidence_invalid", at)} <= {(f["kind"], f["line"]) for f in rep["findings"]}
    finally:
        restore = base_policy()
        restore["audit"]["checkpoint_seconds"] = 1
        gw.apply_policy(json.dumps(restore), agw.layout, actor="ops", source="restore")


def search(g, *args: str) -> tuple[int, list[dict]]:
    out = subprocess.run([str(CLI), "audit", "search", str(g.layout.audit_log), *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()]


def test_a_request_is_found_by_id_app_api_code_and_time_and_business_errors_apart(agw, secret):  # LOG-2
    """Issue 26 (LOG-2): `apisec audit search` finds requests in the audit log by request id,
    app, API, refusal code, status and time range, and the business errors (calls the gateway
    let through that the backend answered 4xx or 5xx) apart from the gateway's refusals."""
    c = Client(agw, secret)
    t0 = int(time.time())
    ok = c.send(c.sign("GET", "/api/v1/info/research/r-search"))
    assert ok.status_code == 200
    failed = c.get("/api/v1/market/quotes/600000?demo_status=503", headers={"x-app-id": "demo-partner"})
    assert failed.status_code == 503
    forged = c.sign("GET", "/api/v1/info/research/r-a")
    forged["url"] = forged["url"].replace("r-a", "r-b")
    refused = c.send(forged)
    assert refused.json()["error"] == "signature_invalid"
    ids = [ok.json()["headers"]["x-request-id"], refused.json()["request_id"]]
    read_audit(agw, ids[1])
    time.sleep(1.2)
    rc, found = search(agw, "--id", ids[0])
    assert rc == 0 and [r["request_id"] for r in found] == [ids[0]] and found[0]["api"] == "info.research"
    rc, found = search(agw, "--app", "demo-partner", "--code", "signature_invalid", "--since", str(t0))
    assert rc == 0 and ids[1] in [r["request_id"] for r in found] and all(r["decision"] == "deny" for r in found)
    rc, found = search(agw, "--business-errors", "--api", "market.quote", "--since", str(t0))
    assert rc == 0 and {(r["status"], r["decision"]) for r in found} == {(503, "allow")}, found
    assert all(r.get("code") != "signature_invalid" for r in found), "a refusal is not a business error"
    rc, found = search(agw, "--status", "5xx", "--app", "demo-partner", "--since", str(t0))
    assert rc == 0 and all(r["status"] >= 500 for r in found) and found
    # a time range before the traffic finds nothing (exit 1), RFC 3339 accepted
    rc, found = search(agw, "--until", "2020-01-01T00:00:00+08:00", "--id", ids[0])
    assert rc == 1 and found == []
    out = subprocess.run([str(CLI), "audit", "search", str(agw.layout.audit_log), "--id", ids[0], "--format", "text"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and ids[0] in out.stdout and "info.research" in out.stdout
