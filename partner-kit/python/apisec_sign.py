#!/usr/bin/env python3
"""Signing a request for an apisec gateway, in Python (standard library; `cryptography` for
ECDSA P-256; the national algorithms through OpenSSL 3: `hashlib` for SM3 and HMAC-SM3, the
`openssl` command for SM2). RFC 9421 HTTP Message Signatures with an RFC 9530 Content-Digest.

    python apisec_sign.py send --url https://gw.example.com/api/v1/info/research/r-1 \
        --app APP_ID --keyid KEY_ID --secret-b64 APP_SECRET [--ca ca.pem]
    python apisec_sign.py send --url https://gw.example.com/api/v1/orders --method POST \
        --data '{"symbol":"600000","side":"buy","qty":100}' --app APP_ID --keyid KEY_ID \
        --key app.key.pem [--ca ca.pem]
    python apisec_sign.py vectors ../../vectors/signing.json   # check against the test vectors

National algorithms (DATA-5; the gateway's docs/national.md): add --alg hmac-sm3 (with
--secret-b64) or --alg sm2-sm3 (with --key sm2.key.pem, and --sm2-id ID when the gateway team
registered your key with an ID other than the default 1234567812345678); a body then carries an
`sm3` Content-Digest. `vectors ../../vectors/national.json` checks them.

Sessions (the gateway's own endpoint, SES-1) and user-bound APIs (ID-4): establish with
    python apisec_sign.py send --url https://gw.example.com/apisec/v1/sessions --method POST \
        --data '{"caller_code":"APP_ID","mac":"AA-BB-CC-DD-EE-01"}' --app APP_ID --keyid KEY_ID ...
then add --session SESSION_ID --mac AA-BB-CC-DD-EE-01 (and --sdk VERSION) to every later call:
x-session-id, x-device-mac and x-sdk-version are sent and covered by the signature.

What the gateway expects (docs/partners.md "Wire protocol for callers"):
  - x-app-id: the App_ID; with a body, content-type and content-digest: sha-256=:<base64>:
  - covered components, in this order: "@method" "@authority" "@path" "@query" "x-app-id",
    and "content-digest" when there is a body;
  - parameters: created (unix seconds, now), nonce (unique per request), keyid, alg.
"""
import base64
import hashlib
import hmac
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def content_digest(body: bytes, alg: str = "sha-256") -> str:
    """RFC 9530 Content-Digest: `sha-256`, or `sm3` (the national hash, GB/T 32905; hashlib
    has it where Python's OpenSSL does, as OpenSSL 3 does)."""
    h = hashlib.sha256(body) if alg == "sha-256" else hashlib.new("sm3", body)
    return f"{alg}=:" + base64.b64encode(h.digest()).decode() + ":"


def authority(u) -> str:
    """Host[:port] as the HTTP client sends it: the port only when it is not the default."""
    default = {"https": 443, "http": 80}.get(u.scheme)
    host = u.hostname.lower()
    return f"{host}:{u.port}" if u.port and u.port != default else host


def signature_parts(method, url, app, body, keyid, alg, created, nonce, extra=(), digest=None):
    """The headers to send (before the signature), the Signature-Input value and the signature
    base, exactly as the gateway rebuilds them. `extra`: more (name, value) headers to send and
    cover (the session, the device MAC, the SDK version). `digest`: the Content-Digest
    algorithm (`sm3` with the national algorithms, `sha-256` otherwise)."""
    digest = digest or ("sm3" if alg in ("hmac-sm3", "sm2-sm3") else "sha-256")
    u = urlsplit(url)
    headers = [("x-app-id", app), *extra]
    components = ["@method", "@authority", "@path", "@query", "x-app-id", *(name for name, _ in extra)]
    if body:
        headers += [("content-type", "application/json"), ("content-digest", content_digest(body, digest))]
        components.append("content-digest")
    params = "(" + " ".join(f'"{c}"' for c in components) + ")"
    params += f';created={created};nonce="{nonce}";keyid="{keyid}";alg="{alg}"'
    values = {
        "@method": method.upper(),
        "@authority": authority(u),
        "@path": u.path or "/",
        "@query": "?" + u.query,
        **dict(headers),
    }
    base = "\n".join(f'"{c}": {values[c]}' for c in components) + f'\n"@signature-params": {params}'
    return headers, "sig1=" + params, base


SM2_DEFAULT_ID = "1234567812345678"  # GB/T 32918 / GM/T 0009's default distinguishing ID


def sign_base(base: str, alg: str, secret_b64=None, key_file=None, sm2_id=SM2_DEFAULT_ID) -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if alg == "hmac-sha256":
        raw = hmac.new(base64.b64decode(secret_b64), base.encode(), hashlib.sha256).digest()
    elif alg == "hmac-sm3":
        raw = hmac.new(base64.b64decode(secret_b64), base.encode(), "sm3").digest()
    elif alg == "sm2-sm3":
        # `cryptography` has no SM2; OpenSSL 3's command does SM2 over SM3 with the Z value of
        # the distinguishing ID (without `distid` it would use an empty ID, which the gateway
        # refuses). It writes DER; RFC 9421 wants r || s, 32 bytes each.
        der = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-inkey", str(key_file),
                              "-pkeyopt", f"distid:{sm2_id}"], input=base.encode(), capture_output=True,
                             check=True).stdout
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        r, s = decode_dss_signature(key.sign(base.encode(), ec.ECDSA(hashes.SHA256())))
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 9421: r || s, not DER
    return "sig1=:" + base64.b64encode(raw).decode() + ":"


def send(args: dict) -> int:
    body = args.get("data", "").encode()
    method = args.get("method") or ("POST" if body else "GET")
    alg = args.get("alg") or ("ecdsa-p256-sha256" if "key" in args else "hmac-sha256")
    nonce = base64.urlsafe_b64encode(os.urandom(18)).decode().rstrip("=")
    extra = [(h, args[k]) for k, h in (("session", "x-session-id"), ("mac", "x-device-mac"),
                                       ("sdk", "x-sdk-version")) if k in args]
    headers, sig_input, base = signature_parts(method, args["url"], args["app"], body, args["keyid"], alg,
                                               int(time.time()), nonce, extra)
    signature = sign_base(base, alg, args.get("secret-b64"), args.get("key"), args.get("sm2-id", SM2_DEFAULT_ID))
    headers += [("signature-input", sig_input), ("signature", signature)]
    u = urlsplit(args["url"])
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=args.get("ca"))
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
    conn.request(method, u.path + ("?" + u.query if u.query else ""), body=body or None, headers=dict(headers))
    resp = conn.getresponse()
    print(resp.status)
    print(resp.read().decode(errors="replace"))
    return 0 if 200 <= resp.status < 300 else 1


def vectors(path: str) -> int:
    doc = json.loads(Path(path).read_text())
    for case in doc["cases"]:
        p, req = case["params"], case["request"]
        key = doc["keys"][case["key"]]
        body = req["body"].encode()
        headers, sig_input, base = signature_parts(req["method"], req["url"], doc["app_id"], body, p["keyid"],
                                                   p["alg"], p["created"], p["nonce"])
        key_file = Path(path).parent / key["private_key_file"] if "private_key_file" in key else None
        print(json.dumps({
            "name": case["name"], "content-digest": dict(headers).get("content-digest"),
            "signature-input": sig_input, "signature_base": base,
            "signature": sign_base(base, p["alg"], key.get("secret_b64"), key_file,
                                   key.get("sm2_id", SM2_DEFAULT_ID)),
        }))
    return 0


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "vectors":
        return vectors(argv[1])
    if argv and argv[0] == "send" and len(argv) % 2 == 1:
        args = {argv[i].lstrip("-"): argv[i + 1] for i in range(1, len(argv), 2)}
        return send(args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
