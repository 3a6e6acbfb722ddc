"""The partner kit (partner-kit/, vectors/): signing examples in Python, Go, Java and Node, each
with only its language's standard library (Python adds `cryptography` for P-256), checked
against the published test vectors and run against a real gateway: HMAC at S1, ECDSA P-256 at
S3 with a body, and a refused case (ID-2, DATA-3, DATA-4, ATK-1)."""
from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from conftest import DEMO_KEY, ROOT, read_audit
from helpers import KIT_LANGS as LANGS
from helpers import kit_run as run
from helpers import kit_send as send

VECTORS = json.loads((ROOT / "vectors/signing.json").read_text())


def verify_p256(public_pem: str, base: str, signature_header: str) -> bool:
    raw = base64.b64decode(signature_header.split("=:", 1)[1].rstrip(":"))
    assert len(raw) == 64, "RFC 9421 wants r || s (64 bytes), not DER"
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key = serialization.load_pem_public_key(public_pem.encode())
    try:
        key.verify(der, base.encode(), ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


@pytest.mark.parametrize("lang", LANGS)
def test_example_reproduces_the_published_vectors(lang):
    out = run(lang, "vectors", str(ROOT / "vectors/signing.json"))
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [g["name"] for g in got] == [c["name"] for c in VECTORS["cases"]]
    for g, case in zip(got, VECTORS["cases"]):
        exp = case["expected"]
        for field in ("content-digest", "signature-input", "signature_base"):
            assert g[field] == exp[field], f"{lang} {case['name']} {field}"
        if case["key"] == "hmac":
            assert g["signature"] == exp["signature"], f"{lang} {case['name']}"
        else:
            # ECDSA draws a nonce: another library's signature differs but must verify, and the
            # published (RFC 6979) one verifies too.
            public = VECTORS["keys"]["p256"]["public_key_pem"]
            assert verify_p256(public, g["signature_base"], g["signature"]), f"{lang} {case['name']}"
            assert verify_p256(public, exp["signature_base"], exp["signature"])
            assert not verify_p256(public, exp["signature_base"] + " ", g["signature"])


@pytest.mark.parametrize("lang", LANGS)
def test_example_signs_s1_hmac_and_s3_p256_against_the_gateway(lang, gateway, secret):
    https = f"https://127.0.0.1:{gateway.layout.https_port}"
    status, echoed = send(lang, gateway, "--url", f"{https}/api/v1/info/research/r-2026-001?lang=zh-CN",
                          "--keyid", "demo-partner-hmac", "--secret-b64", secret)
    assert status == 200, echoed
    assert echoed["path"] == "/api/v1/info/research/r-2026-001?lang=zh-CN"
    assert echoed["headers"]["x-apisec-app"] == "demo-partner"
    assert echoed["headers"]["x-apisec-level"] == "S1"
    body = '{"symbol":"600000","side":"buy","qty":100,"memo":"浦发银行"}'
    status, echoed = send(lang, gateway, "--url", f"{https}/api/v1/orders", "--method", "POST", "--data", body,
                          "--keyid", "demo-partner-p256", "--key", str(DEMO_KEY))
    assert status == 200, echoed
    assert echoed["headers"]["x-apisec-level"] == "S3"
    assert echoed["body_bytes"] == len(body.encode())


@pytest.mark.parametrize("lang", LANGS)
def test_example_with_a_wrong_secret_is_refused(lang, gateway):
    https = f"https://127.0.0.1:{gateway.layout.https_port}"
    before = gateway.stat("cluster.backend.upstream_rq_total")
    wrong = base64.b64encode(b"w" * 32).decode()
    status, answer = send(lang, gateway, "--url", f"{https}/api/v1/info/research/r-2026-001",
                          "--keyid", "demo-partner-hmac", "--secret-b64", wrong)
    assert status == 401 and answer["error"] == "signature_invalid"
    record = read_audit(gateway, answer["request_id"])
    assert record["audit"]["code"] == "signature_invalid" and record["audit"]["app"] == "demo-partner"
    assert gateway.stat("cluster.backend.upstream_rq_total") == before


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, secret):
    """The gateway as `make run` ships it: policies/securities.yaml unchanged, sessions included."""
    from conftest import gw, start_gateway

    policy = json.loads(gw.policy_to_json(ROOT / "policies/securities.yaml"))
    g = start_gateway(tmp_path_factory.mktemp("gw-shipped"), policy, secret=secret, concurrency=1)
    yield g
    g.stop()


MAC = "AA-BB-CC-DD-EE-01"


@pytest.mark.parametrize("lang", LANGS)
def test_kit_walks_the_shipped_demo_session_login_and_s3_order(lang, shipped, secret):  # SES-1, ID-4, DATA-4
    """Issue 21 item 14: on 91ff9c0 the kits' S3 example got 401 session_required on `make run`
    (their tests passed only on a policy without sessions). Each kit establishes a session,
    logs the user in, and places an S3 order with the session, device-MAC and SDK-version
    headers covered by its signature, against the policy exactly as shipped."""
    https = f"https://127.0.0.1:{shipped.layout.https_port}"
    hmac_args = ["--keyid", "demo-partner-hmac", "--secret-b64", secret]
    status, created = send(lang, shipped, "--url", f"{https}/apisec/v1/sessions", "--method", "POST",
                           "--data", json.dumps({"caller_code": "demo-partner", "mac": MAC}), *hmac_args)
    assert status == 201, created
    sid = created["session_id"]
    on_session = ["--session", sid, "--mac", MAC, "--sdk", "2.4.0"]
    p256 = ["--keyid", "demo-partner-p256", "--key", str(DEMO_KEY)]
    status, login = send(lang, shipped, "--url", f"{https}/api/v1/users/login", "--method", "POST",
                         *on_session, *p256)
    assert status == 200 and login["path"] == "/api/v1/users/login", login
    body = '{"symbol":"600000","side":"buy","qty":100}'
    status, echoed = send(lang, shipped, "--url", f"{https}/api/v1/orders", "--method", "POST", "--data", body,
                          *on_session, *p256)
    assert status == 200, echoed
    assert echoed["headers"]["x-apisec-user"] == "u-demo" and echoed["headers"]["x-apisec-level"] == "S3"
    assert echoed["headers"]["x-sdk-version"] == "2.4.0"
    audit = read_audit(shipped, echoed["headers"]["x-request-id"])["audit"]
    covered = audit["evidence"]["signature_input"]
    for name in ("x-session-id", "x-device-mac", "x-sdk-version", "content-digest"):
        assert f'"{name}"' in covered, covered
    # without the session the same order is refused, as the shipped policy says
    before = shipped.stat("cluster.backend.upstream_rq_total")
    status, refused = send(lang, shipped, "--url", f"{https}/api/v1/orders", "--method", "POST", "--data", body, *p256)
    assert status == 401 and refused["error"] == "session_required", refused
    assert read_audit(shipped, refused["request_id"])["audit"]["code"] == "session_required"
    assert shipped.stat("cluster.backend.upstream_rq_total") == before
