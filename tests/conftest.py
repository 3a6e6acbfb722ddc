"""End-to-end harness: a real Envoy 1.40 loading the built apisec .wasm, on free loopback ports,
with a generated configuration (the same renderer `make run` uses), the demo upstream, real HTTP
and real TLS. On failure the Envoy log is printed."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "envoy"))

import certs as certs_mod  # noqa: E402
import gateway as gw  # noqa: E402

# APISEC_WASM runs the suite against another build (e.g. an older one, to show a test catches a hole).
WASM = Path(os.environ.get("APISEC_WASM") or ROOT / "target/wasm32-wasip1/release/apisec_filter.wasm")
CLI = ROOT / "target/release/apisec"
DEMO_KEY = ROOT / "policies/demo-keys/demo-partner.key.pem"
SECRET_VAR = "APISEC_DEMO_PARTNER_SECRET"
# The audit chain's key (LOG-1), as securities.yaml names it; one per test session.
AUDIT_KEY_VAR = "APISEC_AUDIT_KEY"
AUDIT_KEY = base64.b64encode(os.urandom(32)).decode()


def base_policy() -> dict:
    """The shipped securities example (LVL-5), with a smaller body limit for the size tests,
    without automatic bans (the refusal tests would ban the demo app; bans have their own tests),
    without its rate limits (the tests send bursts from one address; test_rate_limits.py),
    and without sessions: its user-bound account and trading APIs then take the user the signing
    app asserts (`x-user-id`), as the tests of every other control call them. Sessions and
    two-factor users have their own tests (test_sessions.py, which adds them back)."""
    doc = json.loads(gw.policy_to_json(ROOT / "policies/securities.yaml"))
    doc["gateway"]["max_body_bytes"] = 64 * 1024
    doc.pop("bans", None)
    doc.pop("rate_limits", None)
    sessions = doc.pop("sessions")
    gone = {sessions["create_api"], sessions["logout_api"], *sessions["login_apis"]}
    doc["apis"] = [a for a in doc["apis"] if a["id"] not in gone]
    doc["grants"] = [g for g in doc["grants"] if not set(g.get("apis", [])) & gone]
    return doc


class Client:
    """Signs with the project's own CLI (`apisec sign`) and sends with `requests`."""

    def __init__(self, gateway: gw.Gateway, secret: str):
        self.gw = gateway
        self.secret = secret
        self.http = f"http://127.0.0.1:{gateway.layout.http_port}"
        self.https = f"https://127.0.0.1:{gateway.layout.https_port}"
        self.mtls = f"https://127.0.0.1:{gateway.layout.mtls_port}"
        self.session = requests.Session()
        self.session.trust_env = False  # never a proxy from the environment
        if gateway.layout.certs is not None:
            self.session.verify = str(gateway.layout.certs / "ca.pem")

    def sign(self, method: str, path: str, *, body: bytes | None = None, keyid: str = "demo-partner-hmac",
             app: str = "demo-partner", base: str | None = None, extra: list[str] | None = None) -> dict:
        url = (base or self.https) + path
        args = [str(CLI), "sign", "--format", "json", "--app", app, "--keyid", keyid, "--url", url, "--method", method]
        if keyid.endswith("hmac"):
            args += ["--secret", self.secret]
        else:
            args += ["--key", str(DEMO_KEY)]
        if body:
            args += ["--data", body.decode()]
        args += extra or []
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        signed = json.loads(out.stdout)
        signed["body"] = body or b""
        return signed

    def send(self, signed: dict, headers: list[tuple[str, str]] | None = None, cert: str | None = None,
             source: str | None = None) -> requests.Response:
        """Sends a signed request; `headers` replaces the header list when given (for tampering)."""
        hdrs = headers if headers is not None else list(signed["headers"].items())
        return self.raw(signed["method"], signed["url"], hdrs, signed["body"], cert=cert, source=source)

    def tls_context(self, cert: str | None = None):
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.gw.layout.certs / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(self.gw.layout.certs / f"{cert}.pem"), str(self.gw.layout.certs / f"{cert}.key"))
        return ctx

    def connect(self, url: str, cert: str | None = None, source: str | None = None):
        """An HTTP/1.1 connection to the gateway, from a chosen loopback source address."""
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(url)
        src = (source, 0) if source else None
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname, u.port, context=self.tls_context(cert), timeout=10,
                                               source_address=src)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=10, source_address=src)

    def start(self, method: str, url: str, headers: list[tuple[str, str]], body_len: int = 0,
              cert: str | None = None, source: str | None = None):
        """Sends the request line and headers only; the caller sends the body (or not) later."""
        from urllib.parse import urlsplit

        u = urlsplit(url)
        conn = self.connect(url, cert=cert, source=source)
        own_host = any(k.lower() == "host" for k, _ in headers)  # a replica behind a shared name
        conn.putrequest(method, u.path + (f"?{u.query}" if u.query else ""), skip_host=own_host,
                        skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body_len:
            conn.putheader("content-length", str(body_len))
        conn.endheaders()
        return conn

    @staticmethod
    def response(conn) -> requests.Response:
        r = conn.getresponse()
        resp = requests.Response()
        resp.status_code = r.status
        resp._content = r.read()
        resp.headers.update(r.getheaders())
        conn.close()
        return resp

    def raw(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes = b"",
            cert: str | None = None, source: str | None = None) -> requests.Response:
        """Sends exactly these header lines, repeats included (http.client keeps duplicates)."""
        conn = self.start(method, url, headers, body_len=len(body), cert=cert, source=source)
        if body:
            conn.send(body)
        return self.response(conn)

    def get(self, path: str, headers: dict | None = None, tls: bool = False, **kw) -> requests.Response:
        return self.session.get((self.https if tls else self.http) + path, headers=headers or {}, timeout=10, **kw)


def audit_lines(gateway: gw.Gateway) -> list[dict]:
    """Every line of the audit log, each shaped as {"audit": the filter's record or None, and the
    record's fields}: a filter record is the line itself; Envoy's own record (a request the filter
    never saw) is marked "source": "envoy"."""
    out = []
    envoy_records = gateway.layout.build / "envoy-access.log"  # Envoy's own, a file of their own
    for path in (gateway.layout.audit_log, envoy_records):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            own = rec.get("source") == "envoy"
            out.append({"upstream": None, **rec, "audit": None if own else rec})
    return out


def read_audit(gateway: gw.Gateway, request_id: str, timeout: float = 8.0) -> dict:
    """The audit record of one request, from the Envoy access log (flushed about once a second)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for rec in audit_lines(gateway):
            if rec.get("request_id") == request_id:
                return rec
        time.sleep(0.2)
    raise AssertionError(f"no audit record for request {request_id}")


# The filter adds allowed requests to `apisec.allowed` on a 1 s tick (refusals at once).
METRICS_FLUSH_SECONDS = 1.0


def flushed_stat(gateway: gw.Gateway, name: str) -> int:
    """A counter once the filter's pending counts have reached Envoy (one flush period and a margin)."""
    time.sleep(METRICS_FLUSH_SECONDS + 0.5)
    return gateway.stat(name)


def prometheus_series(text: str) -> dict[str, float]:
    """`name{labels} value` lines of Envoy's /stats/prometheus, by `name{labels}`; the native
    build's `envoy_dynamicmodulescustom_apisec_*` under the names monitoring/prometheus.yml
    relabels them to (`apisec_*`, the Wasm build's)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key.removeprefix(gw.NATIVE_PROMETHEUS_PREFIX)] = float(value)
    return out


def decided(gateway: gw.Gateway, decision: str, code: str) -> int:
    """Requests counted in apisec_requests_total with this decision and code, over every app and
    API (the labelled counter; the per-code unlabelled ones are opt-in), once flushed."""
    time.sleep(METRICS_FLUSH_SECONDS + 0.5)
    want = {f'decision="{decision}"', f'code="{code}"'}
    total = 0.0
    for key, value in prometheus_series(gateway.admin("/stats/prometheus")).items():
        if key.startswith("apisec_requests_total{") and want <= set(key[key.index("{") + 1:-1].split(",")):
            total += value
    return int(total)


def start_gateway(tmp: Path, policy: dict, *, secret: str | None, concurrency: int = 2,
                  wasm: Path = WASM, with_tls: bool = True, rate_limits: dict | None = None,
                  state_port: int | None = None, certs: Path | None = None,
                  env: dict | None = None, state_tls_ca: Path | None = None,
                  backend_tls: bool = False, upstream_cert: str = "backend",
                  bootstrap_hook=None, memory_limit: int | None = None, log_path: bool = False) -> gw.Gateway:
    tmp.mkdir(parents=True, exist_ok=True)
    if with_tls and certs is None:
        certs = tmp / "certs"
        certs_mod.generate(certs)
    layout = gw.Layout(
        build=tmp, wasm=wasm, certs=certs, concurrency=concurrency,
        http_port=gw.free_port(), https_port=gw.free_port(), mtls_port=gw.free_port(), admin_port=gw.free_port(),
        operator_port=gw.free_port(),
        upstream_port=gw.free_port(), app_rate_limits=rate_limits or {}, state_port=state_port,
        state_tls_ca=state_tls_ca, backend_tls=backend_tls,
    )
    gw.render(json.dumps(policy), layout)
    if bootstrap_hook is not None:  # a test's own routes or listeners on top of envoy/gateway.yaml
        doc = json.loads(layout.bootstrap.read_text())
        bootstrap_hook(doc)
        layout.bootstrap.write_text(json.dumps(doc))
    env = {AUDIT_KEY_VAR: AUDIT_KEY, **(env or {}), **({SECRET_VAR: secret} if secret else {})}
    if not secret:
        os.environ.pop(SECRET_VAR, None)
    g = gw.Gateway(layout, env=env, upstream_cert=upstream_cert, memory_limit=memory_limit, log_path=log_path)
    try:
        g.start()
    except Exception:
        g.stop()
        raise
    return g


def new_secret() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="session")
def secret() -> str:
    return new_secret()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, secret):
    g = start_gateway(tmp_path_factory.mktemp("gw"), base_policy(), secret=secret)
    yield g
    g.stop()


@pytest.fixture
def client(gateway, secret) -> Client:
    return Client(gateway, secret)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for name in ("gateway", "own_gateway"):
            g = item.funcargs.get(name)
            if isinstance(g, gw.Gateway):
                rep.sections.append((f"envoy log ({name})", g.log_tail(120)))


def pytest_configure(config):
    """The markers `make e2e M=...` selects by (docs/developers.md "Tests")."""
    config.addinivalue_line("markers", "slow: long runs (the soak test); `make e2e M='not slow'` leaves them out")
    config.addinivalue_line("markers", "cluster: tests on the cluster backend (Redis through webdis)")
