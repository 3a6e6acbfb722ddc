"""Helpers more than one test module uses (the tests import them from here, never from one
another): refusal checks, waiting, Envoy's stats, the cluster pair of gateways on one store,
and the sessions policy."""

from __future__ import annotations

import json
import os
import subprocess
import time

import gateway as gw
import state_store
from conftest import ROOT, SECRET_VAR, WASM, Client, base_policy, prometheus_series, read_audit, start_gateway

# Both replicas serve one public name, as behind a load balancer: requests are signed for it.
PUBLIC = "gw.example.test"
RESEARCH = "/api/v1/info/research/r-2026-001"  # S1, HMAC-signed, granted by demo-partner-info
QUOTE = "/api/v1/market/quotes/600000"  # S0: an unverified App_ID
CREDENTIALS_VAR = "APISEC_STATE_CREDENTIALS"


KIT = ROOT / "partner-kit"
# The review record an API added by a test went online under (OPS-1; `policy apply` wants one).
REVIEW = {"by": "API review board", "ticket": "ARB-TEST-1", "date": "2026-12-01"}

KIT_LANGS = ("python", "go", "java", "node")


def kit_run(lang: str, *args: str, national: bool = False) -> subprocess.CompletedProcess:
    """Runs one partner-kit example as its README says. `national`: the way each runs with the SM
    algorithms (Java with BouncyCastle on the class path, Go with national.go and Debian's gmsm;
    Python and Node the same command, Node's sm-crypto installed by `make setup`)."""
    env = {"HOME": str(ROOT / "build"), **os.environ, "GOCACHE": str(ROOT / "build/go-cache"),
           "GOPATH": str(ROOT / "build/gopath")}
    cmd = {
        "python": [str(ROOT / ".venv/bin/python"), "apisec_sign.py"],
        "go": ["go", "run", "apisec_sign.go"],
        "java": ["java", "ApisecSign.java"],
        "node": ["node", "apisec_sign.js"],
    }[lang]
    if national and lang == "go":
        cmd = ["go", "run", "-tags", "national", "apisec_sign.go", "national.go"]
        env.update(GO111MODULE="off", GOPATH="/usr/share/gocode")
    if national and lang == "java":
        cmd = ["java", "-cp", "/usr/share/java/bcprov.jar", "ApisecSign.java"]
    return subprocess.run([*cmd, *args], cwd=KIT / lang, capture_output=True, text=True, timeout=180, env=env)


def kit_send(lang: str, gateway, *args: str, national: bool = False) -> tuple[int, dict]:
    """A kit's `send` to `gateway` as demo-partner: the status and the JSON answer."""
    import json

    out = kit_run(lang, "send", "--app", "demo-partner", "--ca", str(gateway.layout.certs / "ca.pem"), *args,
                  national=national)
    lines = out.stdout.splitlines()
    assert lines, out.stderr
    return int(lines[0]), json.loads("\n".join(lines[1:]) or "{}")


def assert_refused(gateway, resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert set(body) == {"error", "request_id"}, "the caller gets the code only, no detail"
    rec = read_audit(gateway, body["request_id"])
    assert rec["status"] == status
    assert rec["upstream"] is None, "a refused request must not reach the upstream"
    audit = rec["audit"]
    assert audit["decision"] == "deny" and audit["code"] == code, audit
    return audit


def ecds_stats(g: gw.Gateway) -> dict[str, int]:
    out = {}
    for line in g.admin("/stats?filter=extension_config_discovery.http_filter.apisec").splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            out[k.rsplit(".", 1)[-1]] = int(v)
    return out


def reload(g, doc: dict) -> bool:
    """Pushes a policy through ECDS; True if Envoy took it, False if the filter refused it."""
    import json

    before = ecds_stats(g)
    gw.write_ecds(json.dumps(doc), g.layout)
    wait_for(lambda: ecds_stats(g)["update_success"] > before["update_success"]
             or ecds_stats(g)["update_rejected"] > before["update_rejected"], what="policy update")
    return ecds_stats(g)["update_success"] > before["update_success"]


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric(g, name: str, **labels: str) -> float:
    """A series of Envoy's Prometheus output by its name and labels, in any order."""
    time.sleep(1.5)  # counts reach Envoy once a second
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in prometheus_series(g.admin("/stats/prometheus")).items():
        base, _, rest = key.partition("{")
        if base == name and set(filter(None, rest.rstrip("}").split(","))) == want:
            return value
    return 0


def upstream_count(g) -> int:
    return g.stat("cluster.backend.upstream_rq_total")


def store_opened(store, timeout: float, prefix: str = "apisec:") -> int:
    """The cluster store's epoch (`horizon`) once a gateway has opened the store; fails the
    test when none has within `timeout` seconds."""
    deadline = time.time() + timeout
    while not (h := store.redis_cli("GET", f"{prefix}horizon").strip()):
        assert time.time() < deadline, "no gateway opened the cluster store"
        time.sleep(0.02)
    return int(h)


class Pair:
    """One store and two gateways sharing it."""

    def __init__(self, tmp, secret, policy: dict | None = None, timeout_ms: int = 500,
                 credentials: str | None = None, env: dict | None = None, app_share: int | None = None):
        self.tmp = tmp
        self.secret = secret
        self.env = env or {}
        self.store = state_store.StateStore(tmp / "store", gw.free_port(), gw.free_port(), credentials).start()
        self.policy = state_store.with_cluster_state(policy or base_policy(), timeout_ms=timeout_ms,
                                                     credentials_env=CREDENTIALS_VAR if credentials else None,
                                                     app_share=app_share)
        self.certs = tmp / "certs"
        import certs as certs_mod

        certs_mod.generate(self.certs)
        self.a = self.b = None
        try:
            self.a = self.start("a")
            self.b = self.start("b")
            self.wait_opened()
        except Exception:
            self.stop()  # never leave a store (or an Envoy) running behind a failed start
            raise

    def wait_opened(self) -> None:
        """Waits until a gateway's configuration has opened the store (its first, empty batch
        creates the store's epoch, `horizon`). Until then the first request's own batch does,
        and a request signed in the second before that batch is refused as older than the
        store (created_too_old, 401): a fresh store cannot vouch for what came before it."""
        store_opened(self.store, 10.0, self.policy["state"]["cluster"].get("key_prefix", "apisec:"))

    def start(self, name: str):
        return start_gateway(self.tmp / name, self.policy, secret=self.secret, concurrency=2,
                             state_port=self.store.http_port, certs=self.certs, env=self.env)

    def restart(self) -> None:
        for g in (self.a, self.b):
            g.stop()
        for g in (self.a, self.b):
            g.start()

    def stop(self) -> None:
        for g in (self.a, self.b):
            if g is not None:
                g.stop()
        self.store.stop()

    def client(self, g) -> Client:
        return Client(g, self.secret)

    def sign(self, path: str = RESEARCH, body: bytes | None = None, method: str = "GET",
             app: str = "demo-partner", keyid: str | None = None) -> dict:
        keyid = keyid or ("demo-partner-p256" if body else "demo-partner-hmac")
        return self.client(self.a).sign(method, path, body=body, keyid=keyid, app=app, base=f"https://{PUBLIC}")

    def send(self, g, signed: dict, source: str | None = None):
        headers = list(signed["headers"].items()) + [("host", PUBLIC)]
        path = signed["url"].split(PUBLIC, 1)[1]
        c = self.client(g)
        return c.raw(signed["method"], f"https://127.0.0.1:{g.layout.https_port}{path}", headers, signed["body"],
                     source=source)


def session_policy(idle: int, lifetime: int, entries: int = 64) -> dict:
    doc = base_policy()
    common = {"level": "S1", "service_object": "toB", "user_auth": False, "personal_info": False,
              "review": REVIEW}
    doc["apis"] += [
        {"id": "session.create", "method": "POST", "path": "/apisec/v1/sessions", "access": "write",
         "function": "session", **common},
        {"id": "session.logout", "method": "DELETE", "path": "/apisec/v1/sessions", "access": "write",
         "function": "session", **common},
        {"id": "info.watchlist", "method": "GET", "path": "/api/v1/watchlist", "access": "read",
         "function": "watchlist", "session": "required", **common},
    ]
    doc["apis"] += [
        {"id": "user.login", "method": "POST", "path": "/api/v1/users/login", "access": "write",
         "function": "session", "session": "required", **common},
        {"id": "user.news", "method": "GET", "path": "/api/v1/users/news", "access": "read",
         "function": "user_news", **{**common, "user_auth": True}},
        {"id": "user.profile", "method": "GET", "path": "/api/v1/users/profile", "access": "read",
         "function": "user_profile", **{**common, "level": "S2", "user_auth": True, "personal_info": True}},
    ]
    doc["opted_out_users"] = ["u-closed"]
    doc["apps"].append({"id": "partner-b", "credentials": [
        {"id": "partner-b-hmac", "alg": "hmac-sha256", "secret_env": SECRET_VAR}]})
    doc["grants"] += [
        {"id": "sessions-a", "app": "demo-partner", "apis": ["session.*", "info.watchlist", "user.*"]},
        {"id": "sessions-b", "app": "partner-b", "apis": ["session.*", "info.watchlist"]},
    ]
    doc["sessions"] = {
        "create_api": "session.create", "logout_api": "session.logout",
        "idle_timeout_seconds": idle, "max_lifetime_seconds": lifetime,
        "slots": 1, "entries_per_slot": entries,
        "operator_route": "apisec-operator", "operators": ["spiffe://apisec.demo/operator/alice"],
        "login_apis": ["user.login"],
    }
    return doc


def manifest_docs(path):
    """The YAML documents of a manifest file."""
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def loads_in_envoy(tmp_path, policy: dict, env_names: list[str]) -> subprocess.CompletedProcess:
    """The policy as istiod or Envoy Gateway hands it over (JSON text in the filter config),
    loaded by a real Envoy with the built .wasm (`--mode validate` runs the filter's configure)."""
    tc = gw.load_yaml(gw.FILTER_YAML)[0]["typed_config"]
    tc["config"]["configuration"]["value"] = json.dumps(policy)
    tc["config"]["vm_config"]["code"]["local"]["filename"] = str(WASM)
    tc["config"]["vm_config"]["environment_variables"]["host_env_keys"] = env_names
    doc = {"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "l", "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
            "http_filters": [{"name": "apisec", "typed_config": tc}, gw.ROUTER]}}]}]}]}}
    path = tmp_path / "manifest-check.yaml"
    path.write_text(json.dumps(doc))
    env = {**os.environ, **{n: "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk=" for n in env_names}}
    return subprocess.run([gw.envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=120, env=env)


class Replicas:
    """The gateways a behaviour table runs on: one with the local store (`local`), or two
    replicas sharing a real store (`cluster`); call `i` goes to replica `i % n`."""

    def __init__(self, backend: str, tmp, secret: str, doc: dict):
        self.backend = backend
        if backend == "local":
            self.pair = None
            self.gateways = [start_gateway(tmp / "gw", doc, secret=secret)]
            self.client = Client(self.gateways[0], secret)
        else:
            self.pair = Pair(tmp, secret, doc)
            self.gateways = [self.pair.a, self.pair.b]

    def g(self, i: int):
        return self.gateways[i % len(self.gateways)]

    def sign(self, app: str, path: str = RESEARCH, extra: list[str] | None = None, keyid: str | None = None) -> dict:
        keyid = keyid or f"{app}-hmac"
        if self.pair is None:
            return self.client.sign("GET", path, app=app, keyid=keyid, extra=extra)
        return self.pair.client(self.pair.a).sign("GET", path, app=app, keyid=keyid, base=f"https://{PUBLIC}",
                                                  extra=extra)

    def send(self, i: int, signed: dict, source: str | None = None, add: list[tuple[str, str]] | None = None):
        """Sends a signed request to replica `i`, with `add` headers after the signed ones."""
        if self.pair is None:
            hdrs = list(signed["headers"].items()) + (add or [])
            return self.client.send(signed, headers=hdrs, source=source)
        hdrs = list(signed["headers"].items()) + [("host", PUBLIC)] + (add or [])
        g = self.g(i)
        path = signed["url"].split(PUBLIC, 1)[1]
        return self.pair.client(g).raw(signed["method"], f"https://127.0.0.1:{g.layout.https_port}{path}", hdrs,
                                       signed["body"], source=source)

    def call(self, i: int, app: str, **kw):
        return self.send(i, self.sign(app), **kw)

    def forged(self, i: int, app: str, source: str):
        """A request under the app's valid key id whose signature does not verify."""
        signed = self.sign(app)
        headers = dict(signed["headers"])
        label, _, _ = headers["signature"].partition("=")
        headers["signature"] = f"{label}=:{'A' * 43}=:"
        return self.send(i, {**signed, "headers": headers}, source=source)

    def quote(self, i: int, source: str, add: list[tuple[str, str]] | None = None, app: str = "demo-partner"):
        """An S0 call: the App_ID it claims is not verified, so it counts by its source."""
        hdrs = [("x-app-id", app)] + (add or [])
        if self.pair is None:
            return self.client.raw("GET", self.client.https + QUOTE, hdrs, source=source)
        g = self.g(i)
        return self.pair.client(g).raw("GET", f"https://127.0.0.1:{g.layout.https_port}{QUOTE}",
                                       [("host", PUBLIC)] + hdrs, source=source)

    def upstream(self) -> int:
        return sum(upstream_count(g) for g in self.gateways)

    def stop(self):
        if self.pair is not None:
            self.pair.stop()
        else:
            self.gateways[0].stop()


def demo_args(build, ports: dict[str, int]) -> list[str]:
    """`envoy/gateway.py run` (what `make run` starts) in `build`, on these ports."""
    import sys

    args = [sys.executable, str(ROOT / "envoy/gateway.py"), "run", "--build", str(build)]
    for name, port in ports.items():
        args += [f"--{name.replace('_', '-')}", str(port)]
    return args


def fresh_ports() -> dict[str, int]:
    return {name: gw.free_port() for name in gw.DEMO_PORTS}


def demo_assets(build) -> None:
    """What `make demo-assets` makes for a demo in `build`: its PKI and its secrets."""
    import base64

    import certs as certs_mod

    certs_mod.generate(build / "certs")
    key = lambda: base64.b64encode(os.urandom(32)).decode()  # noqa: E731
    (build / "demo.env").write_text(
        f"APISEC_DEMO_PARTNER_SECRET={key()}\nAPISEC_AUDIT_KEY={key()}\nAPISEC_OPS_KEY={key()}\n")
