#!/usr/bin/env python3
"""Demo upstream: answers every request with JSON describing what it received (method, path,
headers, body digest), so a user sees exactly what the gateway passed on. Account APIs also
answer with sample personal data (id_number, mobile), so that field hiding (PERM-1) shows."""
import argparse
import hashlib
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        if self.path == "/healthz":  # the gateway's active health check (MON-8)
            return self._health()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {}
        for k, v in self.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        doc = {
            "method": self.command,
            "path": self.path,
            "headers": {k: v[0] if len(v) == 1 else v for k, v in headers.items()},
            "body_bytes": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        out = json.dumps(doc)
        if self.path.startswith("/api/v1/accounts/"):
            # Written as text: amounts beyond a double's precision, a nested owner, and a key in
            # another case, as real account systems send them; the gateway must pass every byte
            # it does not hide (PERM-1).
            out = out[:-1] + (', "id_number": "110101199003071234", "mobile": "13800138000",'
                              ' "MOBILE": "13900139000", "balance": "102400.50",'
                              ' "units": 98765432109876543210, "rate": 0.0100000000000000000001,'
                              ' "owner": {"name": "Zhang San", "mobile": "13700137000"}}')
        out = out.encode()
        # A test's stand-in for a failing backend: `?demo_status=503` answers that status.
        from urllib.parse import parse_qs as _qs, urlsplit as _split

        wanted = _qs(_split(self.path).query).get("demo_status", ["200"])[0]
        self.send_response(int(wanted) if wanted.isdigit() and 200 <= int(wanted) <= 599 else 200)
        if self.path.startswith("/api/v1/users/login"):
            # The demo login service (ID-4): it reports who logged in, and with how many
            # factors, to the gateway, which records it on the session and strips the header.
            from urllib.parse import parse_qs, urlsplit

            q = parse_qs(urlsplit(self.path).query)
            report = q.get("report", [None])[0] or f"user={q.get('user', ['u-demo'])[0]}; factors={q.get('factors', ['2'])[0]}"
            self.send_header("x-apisec-login", report)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def _health(self):
        out = b'{"healthy": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18080)
    # TLS from the gateway (envoy/gateway-upstream-tls.yaml): this server's certificate, and the
    # CA the gateway's client certificate must chain to (the backend accepts only the gateway).
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--client-ca")
    args = ap.parse_args()
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Echo)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(args.client_ca)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
