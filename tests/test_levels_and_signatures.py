"""Per-level enforcement through a real Envoy: S0-S3 identity and signatures (LVL-1, ID-1, ID-2,
ID-3, DATA-3, DATA-4), replay protection (ATK-1), refusals with status, code and audit record."""
from __future__ import annotations

import json
import re
import time

import pytest
from conftest import decided, flushed_stat, read_audit
from helpers import assert_refused


def assert_allowed(gateway, resp, api: str, level: str) -> dict:
    assert resp.status_code == 200, resp.text
    seen = resp.json()["headers"]
    assert seen["x-apisec-app"] == "demo-partner"
    assert seen["x-apisec-api"] == api
    assert seen["x-apisec-level"] == level
    rec = read_audit(gateway, seen["x-request-id"])
    assert rec["audit"]["decision"] == "allow" and rec["audit"]["api"] == api
    assert rec["status"] == 200 and rec["upstream"]
    return rec["audit"]


def headers_of(signed: dict) -> list[tuple[str, str]]:
    return list(signed["headers"].items())


def replace(headers, name, fn):
    return [(k, fn(v) if k == name else v) for k, v in headers]


# ------------------------------------------------------------------ accepted, per level

def test_s0_known_app_id_is_enough(gateway, client):  # ID-1
    r = client.get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"})
    audit = assert_allowed(gateway, r, "market.quote", "S0")
    assert audit["function"] == "market_data" and audit["client_ip"] == "127.0.0.1"


def test_s1_hmac_signature_accepted(gateway, client):  # ID-2, DATA-3
    r = client.send(client.sign("GET", "/api/v1/info/research/r-1?lang=zh"))
    audit = assert_allowed(gateway, r, "info.research", "S1")
    assert audit["keyid"] == "demo-partner-hmac"
    assert "evidence" not in audit


def test_s1_key_pair_signature_accepted(gateway, client):  # ID-2
    r = client.send(client.sign("GET", "/api/v1/info/research/r-2", keyid="demo-partner-p256"))
    assert_allowed(gateway, r, "info.research", "S1")


def test_s2_key_pair_signature_accepted(gateway, client):  # ID-3
    r = client.send(client.sign("GET", "/api/v1/accounts/8800123/balance", keyid="demo-partner-p256"))
    assert_allowed(gateway, r, "account.balance", "S2")


def test_s3_signed_order_with_body_keeps_evidence(gateway, client):  # DATA-3, DATA-4
    body = json.dumps({"symbol": "600000", "side": "buy", "qty": 100, "price": "10.01"}).encode()
    signed = client.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256")
    r = client.send(signed)
    audit = assert_allowed(gateway, r, "trade.order.place", "S3")
    seen = r.json()
    assert seen["body_bytes"] == len(body), "the verified body reached the upstream whole"
    ev = audit["evidence"]
    assert ev["keyid"] == "demo-partner-p256" and ev["alg"] == "ecdsa-p256-sha256"
    assert ev["signature"] == signed["headers"]["signature"]
    assert ev["signature_input"] == signed["headers"]["signature-input"]
    assert ev["content_digest"] == signed["headers"]["content-digest"]
    assert '"content-digest": sha-256=:' in ev["signature_base"]
    assert ev["signature_base"].startswith('"@method": POST\n')


def test_s3_over_real_tls(gateway, client):  # DATA-2 transport for S2/S3 APIs
    signed = client.sign("DELETE", "/api/v1/orders/ord-77", keyid="demo-partner-p256", base=client.https)
    r = client.send(signed)
    assert_allowed(gateway, r, "trade.order.cancel", "S3")
    assert r.json()["headers"]["x-forwarded-proto"] == "https"


def test_signed_request_over_plain_http_refused(gateway, client):  # DATA-1, DATA-2
    signed = client.sign("GET", "/api/v1/info/research/r-plain", base=client.http)
    assert_refused(gateway, client.send(signed), 403, "tls_required")


# ------------------------------------------------------------------ an independent RFC 9421 client

def test_independent_rfc9421_library_hmac_and_ecdsa(gateway, client):
    """Requests signed by the `http-message-signatures` package (not our code) are accepted."""
    import base64
    import secrets

    import requests
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from http_message_signatures import HTTPMessageSigner, algorithms
    from http_message_signatures.resolvers import MappingKeyResolver

    from conftest import DEMO_KEY

    keys = MappingKeyResolver(
        public_keys={},
        private_keys={
            "demo-partner-hmac": base64.b64decode(client.secret),
            "demo-partner-p256": load_pem_private_key(DEMO_KEY.read_bytes(), password=None),
        },
    )
    cases = [
        ("demo-partner-hmac", algorithms.HMAC_SHA256, "GET", "/api/v1/info/research/r-9?x=1&y=2", None, "info.research"),
        ("demo-partner-p256", algorithms.ECDSA_P256_SHA256, "POST", "/api/v1/orders",
         b'{"symbol":"000001","qty":200}', "trade.order.place"),
    ]
    for keyid, alg, method, path, body, api in cases:
        headers = {"x-app-id": "demo-partner"}
        if body:
            headers["content-type"] = "application/json"  # the trading grant restricts fields (PERM-1)
        req = requests.Request(method, client.https + path, headers=headers, data=body).prepare()
        HTTPMessageSigner(signature_algorithm=alg, key_resolver=keys).sign(
            req, key_id=keyid, nonce=secrets.token_urlsafe(16), label="partner",
            covered_component_ids=("@method", "@target-uri", "@authority", "x-app-id"),
            body=body,
        )
        r = client.session.send(req, timeout=10)
        assert_allowed(gateway, r, api, "S3" if body else "S1")


# ------------------------------------------------------------------ replay (ATK-1)

def test_same_request_twice_is_refused_the_second_time(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-3")
    assert client.send(signed).status_code == 200
    audit = assert_refused(gateway, client.send(signed), 401, "nonce_replayed")
    assert audit["app"] == "demo-partner"


def test_replay_refused_across_worker_threads(gateway, client):
    """Envoy runs 2 workers; each attempt opens a new connection, so attempts land on both.
    Exactly one of the copies is accepted."""
    signed = client.sign("POST", "/api/v1/orders", body=b'{"qty":1}', keyid="demo-partner-p256")
    codes = [client.send(signed).status_code for _ in range(12)]
    assert codes.count(200) == 1, codes
    assert codes.count(401) == 11, codes


# ------------------------------------------------------------------ refusals

def test_unknown_api_denied_by_default(gateway, client):  # LVL-1
    r = client.get("/api/v1/admin/users", headers={"x-app-id": "demo-partner"})
    audit = assert_refused(gateway, r, 403, "unknown_api")
    assert audit["path"] == "/api/v1/admin/users"


def test_wrong_method_is_unknown_api(gateway, client):
    r = client.session.post(client.http + "/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"}, timeout=10)
    assert_refused(gateway, r, 403, "unknown_api")


def test_missing_and_unknown_app_id(gateway, client):  # ID-1
    assert_refused(gateway, client.get("/api/v1/market/quotes/1"), 401, "app_id_missing")
    assert_refused(gateway, client.get("/api/v1/market/quotes/1", headers={"x-app-id": "ghost"}), 401, "unknown_app")


def test_duplicate_app_id_refused(gateway, client):
    r = client.raw("GET", client.http + "/api/v1/market/quotes/1", [("x-app-id", "demo-partner"), ("x-app-id", "other")])
    assert_refused(gateway, r, 400, "duplicate_header")


def test_s1_without_signature_refused(gateway, client):  # ID-2
    r = client.get("/api/v1/info/research/r-4", headers={"x-app-id": "demo-partner"}, tls=True)
    assert_refused(gateway, r, 401, "signature_missing")


def test_tampered_header_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-5")
    signed["url"] = signed["url"].replace("r-5", "r-6")
    assert_refused(gateway, client.send(signed), 401, "signature_invalid")


def test_tampered_app_id_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/accounts/1/balance", keyid="demo-partner-p256")
    hdrs = replace(headers_of(signed), "x-app-id", lambda v: "ghost")
    assert_refused(gateway, client.send(signed, hdrs), 401, "unknown_app")


def test_tampered_body_refused(gateway, client):  # DATA-3
    signed = client.sign("POST", "/api/v1/orders", body=b'{"qty":100}', keyid="demo-partner-p256")
    signed["body"] = b'{"qty":900}'
    audit = assert_refused(gateway, client.send(signed), 401, "digest_mismatch")
    assert audit["api"] == "trade.order.place"


def test_wrong_digest_refused_even_if_signed(gateway, client):
    # The client signs a digest that is not the digest of the body it sends.
    signed = client.sign("POST", "/api/v1/orders", body=b'{"qty":100}', keyid="demo-partner-p256")
    signed["body"] = b'{"qty":100} '
    assert_refused(gateway, client.send(signed), 401, "digest_mismatch")


def test_body_without_content_digest_refused(gateway, client):
    signed = client.sign("POST", "/api/v1/orders", body=b'{"qty":1}', keyid="demo-partner-p256")
    hdrs = [(k, v) for k, v in headers_of(signed) if k != "content-digest"]
    assert_refused(gateway, client.send(signed, hdrs), 401, "digest_missing")


def test_missing_covered_component_refused(gateway, client):
    # Signed without covering x-app-id: the app id could be swapped, so it is refused.
    signed = client.sign("GET", "/api/v1/info/research/r-7")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: v.replace(' "x-app-id"', ""))
    assert_refused(gateway, client.send(signed, hdrs), 401, "component_not_covered")


def test_missing_nonce_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-8")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: re.sub(r';nonce="[^"]*"', "", v))
    assert_refused(gateway, client.send(signed, hdrs), 401, "nonce_missing")


@pytest.mark.parametrize("delta,code", [(-330, "created_too_old"), (+330, "created_in_future")])
def test_created_outside_skew_refused(gateway, client, delta, code):
    signed = client.sign("GET", "/api/v1/info/research/r-9", extra=["--created", str(int(time.time()) + delta)])
    assert_refused(gateway, client.send(signed), 401, code)


def test_expired_signature_refused(gateway, client):
    now = int(time.time())
    signed = client.sign("GET", "/api/v1/info/research/r-10", extra=["--created", str(now - 10), "--expires", str(now - 1)])
    assert_refused(gateway, client.send(signed), 401, "signature_expired")


def test_unknown_keyid_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-11")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: v.replace("demo-partner-hmac", "stolen-key"))
    assert_refused(gateway, client.send(signed, hdrs), 401, "unknown_key")


def test_alg_mismatch_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-12")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: v.replace('alg="hmac-sha256"', 'alg="ecdsa-p256-sha256"'))
    assert_refused(gateway, client.send(signed, hdrs), 401, "alg_mismatch")


@pytest.mark.parametrize("path,method,body", [
    ("/api/v1/accounts/1/balance", "GET", None),        # S2
    ("/api/v1/orders", "POST", b'{"qty":1}'),            # S3
])
def test_hmac_not_enough_for_s2_s3(gateway, client, path, method, body):  # ID-3
    signed = client.sign(method, path, body=body, keyid="demo-partner-hmac")
    assert_refused(gateway, client.send(signed), 401, "credential_not_allowed")


def test_duplicate_labels_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-13")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: f"{v}, {v}")
    assert_refused(gateway, client.send(signed, hdrs), 400, "signature_malformed")


def test_two_signatures_refused_as_ambiguous(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-14")
    hdrs = replace(headers_of(signed), "signature-input", lambda v: f"{v}, {v.replace('sig1=', 'sig2=', 1)}")
    hdrs = replace(hdrs, "signature", lambda v: f"{v}, {v.replace('sig1=', 'sig2=', 1)}")
    assert_refused(gateway, client.send(signed, hdrs), 400, "signature_ambiguous")


@pytest.mark.parametrize("header,value", [
    ("signature-input", 'sig1=("@method" "@path"'),
    ("signature-input", "sig1=@@@"),
    ("signature", "sig1=:not base64!:"),
    ("signature", "sig1=notabyteseq"),
])
def test_malformed_structured_fields_refused(gateway, client, header, value):
    signed = client.sign("GET", "/api/v1/info/research/r-15")
    hdrs = replace(headers_of(signed), header, lambda v: value)
    assert_refused(gateway, client.send(signed, hdrs), 400, "signature_malformed")


def test_repeated_signature_header_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-16")
    hdrs = headers_of(signed) + [("signature", signed["headers"]["signature"])]
    assert_refused(gateway, client.send(signed, hdrs), 400, "duplicate_header")


def test_oversized_signature_header_refused(gateway, client):
    signed = client.sign("GET", "/api/v1/info/research/r-17")
    hdrs = replace(headers_of(signed), "signature", lambda v: "sig1=:" + "A" * 12000 + ":")
    assert_refused(gateway, client.send(signed, hdrs), 400, "header_too_large")


def test_oversized_body_refused(gateway, client):
    body = b'{"pad":"' + b"x" * (70 * 1024) + b'"}'
    signed = client.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256")
    assert_refused(gateway, client.send(signed), 413, "body_too_large")


def test_oversized_chunked_body_refused(gateway, client):
    """No content-length: the limit is enforced on the bytes as they arrive."""
    import http.client

    signed = client.sign("POST", "/api/v1/orders", body=b'{"q":1}', keyid="demo-partner-p256")
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.layout.https_port, context=client.tls_context(), timeout=10)
    conn.putrequest("POST", "/api/v1/orders")
    for k, v in headers_of(signed):
        conn.putheader(k, v)
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    chunk = b"y" * 16384
    try:
        for _ in range(8):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the gateway may answer and close before the client finishes
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 413 and body["error"] == "body_too_large"
    assert read_audit(gateway, body["request_id"])["audit"]["code"] == "body_too_large"


def test_signature_by_another_key_refused(gateway, client, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    import subprocess

    from conftest import CLI

    other = tmp_path / "other.key.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out = subprocess.run([str(CLI), "sign", "--format", "json", "--app", "demo-partner", "--keyid", "demo-partner-p256",
                          "--key", str(other), "--url", client.https + "/api/v1/accounts/1/balance"],
                         capture_output=True, text=True, check=True)
    signed = json.loads(out.stdout)
    signed["body"] = b""
    assert_refused(gateway, client.send(signed), 401, "signature_invalid")


# ------------------------------------------------------------------ gateway-owned headers

def test_spoofed_internal_headers_never_reach_upstream(gateway, client):
    spoof = {"x-app-id": "demo-partner", "x-apisec-app": "admin", "x-apisec-level": "S3", "X-Apisec-User": "root"}
    r = client.get("/api/v1/market/quotes/600000", headers=spoof)
    seen = r.json()["headers"]
    assert seen["x-apisec-app"] == "demo-partner"
    assert seen["x-apisec-level"] == "S0"
    assert "x-apisec-user" not in seen

    signed = client.sign("GET", "/api/v1/info/research/r-18")
    r = client.send(signed, headers_of(signed) + [("x-apisec-app", "admin"), ("x-apisec-api", "trade.order.place")])
    seen = r.json()["headers"]
    assert seen["x-apisec-app"] == "demo-partner" and seen["x-apisec-api"] == "info.research"


def test_forwarded_headers_keep_their_bytes_order_and_repeats(gateway, client):
    # The filter hands the request headers back to Envoy in one call (the received ones less any
    # client x-apisec-*, plus the verified ones): nothing else may change on the way upstream.
    hdrs = [("x-app-id", "demo-partner"), ("x-note", "caf\xe9 \xa7 1"), ("x-multi", "one"), ("x-multi", "two"),
            ("x-apisec-app", "admin"), ("Cookie", "a=1"), ("cookie", "b=2")]
    r = client.raw("GET", client.http + "/api/v1/market/quotes/600000?x=1&y=%20", hdrs)
    assert r.status_code == 200
    seen = r.json()
    assert seen["headers"]["x-note"] == "caf\xe9 \xa7 1"  # a non-UTF-8 byte arrives as sent (latin-1 here)
    assert seen["headers"]["x-multi"] == ["one", "two"]
    assert seen["headers"]["x-apisec-app"] == "demo-partner" and seen["headers"]["x-apisec-level"] == "S0"
    assert "a=1" in str(seen["headers"]["cookie"]) and "b=2" in str(seen["headers"]["cookie"])
    assert seen["path"] == "/api/v1/market/quotes/600000?x=1&y=%20" and seen["method"] == "GET"


def test_refused_request_strips_nothing_upstream_because_nothing_is_sent(gateway, client):
    r = client.get("/api/v1/info/research/r-19", headers={"x-app-id": "demo-partner", "x-apisec-app": "demo-partner"}, tls=True)
    assert_refused(gateway, r, 401, "signature_missing")


def test_metrics_count_decisions(gateway, client):
    # Decision counters: refusals are counted at once; allowed requests are summed in the VM and reach
    # Envoy's counter within a second (the filter flushes them on a 1 s tick).
    allowed_before = flushed_stat(gateway, "wasmcustom.apisec.allowed")  # earlier tests' counts settled
    before = decided(gateway, "deny", "unknown_api")
    client.get("/nowhere", headers={"x-app-id": "demo-partner"})
    client.get("/api/v1/market/quotes/1", headers={"x-app-id": "demo-partner"})
    assert decided(gateway, "deny", "unknown_api") == before + 1
    # the unlabelled per-code counters are opt-in (gateway.per_code_counters): not defined here
    assert "apisec.denied.unknown_api" not in gateway.admin("/stats?filter=apisec.denied")
    assert flushed_stat(gateway, "wasmcustom.apisec.allowed") == allowed_before + 1


def test_identity_headers_are_those_the_policy_names(tmp_path, secret):  # ID-1, ID-3
    """`gateway.identity_headers` (issue 24): only the verified facts the backend needs go
    upstream; a client-sent x-apisec-* header is removed whether or not its name is sent."""
    from conftest import Client, base_policy, start_gateway

    doc = base_policy()
    doc["gateway"]["identity_headers"] = ["app", "user"]
    g = start_gateway(tmp_path / "gw", doc, secret=secret)
    try:
        c = Client(g, secret)
        spoof = [("x-apisec-level", "S3"), ("x-apisec-api", "trade.order.place"), ("x-apisec-function", "x")]
        signed = c.sign("GET", "/api/v1/info/research/r-18",
                        extra=["--header", "x-user-id: u-7", "--cover", "x-user-id"])
        r = c.send(signed, headers_of(signed) + spoof)
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert seen["x-apisec-app"] == "demo-partner" and seen["x-apisec-user"] == "u-7"
        for name in ("x-apisec-api", "x-apisec-level", "x-apisec-function"):
            assert name not in seen, (name, seen)
        # the record still has them all
        audit = read_audit(g, seen["x-request-id"])["audit"]
        assert (audit["api"], audit["level"]) == ("info.research", "S1")
        # a name given twice is refused
        bad = base_policy()
        bad["gateway"]["identity_headers"] = ["app", "app"]
        with pytest.raises(Exception, match="identity_headers"):
            from conftest import gw
            gw.apply_policy(json.dumps(bad), g.layout, actor="t", source="test")
    finally:
        g.stop()
