"""Monitoring (issue 13; MON-1, MON-2, MON-4, MON-8, LVL-3) against a real Envoy and a real
Prometheus (Debian's `prometheus`): the filter's metrics labelled by app, API, level, decision and
refusal code as Prometheus reads them; shadow-API calls with the App_ID they claim; an unknown
App_ID as one label value; the policy version; bans and replay-store gauges; the backend
cluster's active health checks and outlier detection; and every query of the checked-in alert
rules and Grafana dashboard (monitoring/) evaluated by that Prometheus against metric names the
gateway really exports. The alert rules' own unit tests run with `promtool test rules`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, Client, base_policy, gw, prometheus_series, read_audit, start_gateway

MONITORING = ROOT / "monitoring"
RESEARCH = "/api/v1/info/research/r-2026-001"  # S1, signed
QUOTE = "/api/v1/market/quotes/600000"  # S0


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make setup` installs Debian's prometheus package"
    return path


def test_alert_rules_pass_promtool():  # MON-2: the rules parse, and their unit tests pass
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        out = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        assert "SUCCESS" in out.stdout + out.stderr


class Prometheus:
    """A real Prometheus scraping one gateway's admin listener with monitoring/prometheus.yml."""

    def __init__(self, tmp: Path, admin_port: int, alertmanager: str | None = None, mtail: str | None = None):
        conf = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        conf["global"]["scrape_interval"] = "1s"
        conf["global"]["evaluation_interval"] = "1s"
        conf["rule_files"] = [str(MONITORING / f) for f in conf["rule_files"]]
        if alertmanager:
            conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
        else:
            conf.pop("alerting")
        job, logs = conf["scrape_configs"]
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{admin_port}"]
        if mtail:  # the apisec-logs job: mtail over this gateway's logs (MON-9)
            logs["static_configs"][0]["targets"] = [mtail]
        else:
            conf["scrape_configs"].remove(logs)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(conf))
        self.port = gw.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self.log = serve(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], tmp / "prometheus.log", self.url)

    def query(self, expr: str) -> list[dict]:
        r = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        doc = r.json()
        assert doc["status"] == "success", f"{expr}: {doc}"
        return doc["data"]["result"]

    def names(self) -> set[str]:
        return set(requests.get(self.url + "/api/v1/label/__name__/values", timeout=10).json()["data"])

    def stop(self):
        stop(self.proc, self.log)


class Mtail:
    """A real mtail (Debian's mtail) running monitoring/apisec.mtail over a gateway's audit log
    and Envoy's log (MON-9)."""

    def __init__(self, tmp: Path, g):
        self.port = gw.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc, self.log = serve(
            [tool("mtail"), "--progs", str(MONITORING / "apisec.mtail"), "--address", "127.0.0.1",
             "--port", str(self.port), "--logs", f"{g.layout.audit_log},{g.envoy_log}", "--logtostderr"],
            tmp / "mtail.log", f"http://{self.address}", ready="/metrics")

    def stop(self):
        stop(self.proc, self.log)


def serve(cmd: list[str], log_path: Path, url: str, ready: str = "/-/ready"):
    """Starts a Prometheus-family server and waits until `url` + `ready` answers: the process
    and its open log."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(url + ready, timeout=1).status_code == 200:
                return proc, log
        except requests.RequestException:
            pass
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.3)
    raise AssertionError(f"{cmd[0]} did not become ready")


def stop(proc: subprocess.Popen, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads((MONITORING / "grafana/apisec-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would fill them for 'All' over a few minutes."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
            .replace('"$app"', '".*"').replace('"$api"', '".*"'))


NAME = re.compile(r"\b((?:apisec|envoy)_[a-z0-9_]+)\b")


def metric_names(expr: str) -> set[str]:
    """The metric names a query reads (label matchers and grouping clauses taken out first)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(NAME.findall(bare))


def small_stores(doc: dict) -> None:
    """64 replay and 64 source slots: the gauges' pass over the stores (GAUGE_KEYS_PER_TICK keys,
    ten ticks a second), which a test waits for to see a ban, takes about a second, where the
    shipped 4096 replay and 1024 source slots take ~43 s."""
    doc["bans"]["ip_slots"] = 64
    doc["gateway"]["replay"]["slots"] = 64


@pytest.fixture(scope="module")
def mgw(tmp_path_factory, secret):
    doc = base_policy()
    # Bans by source after 30 refusals (the gauge below); the traffic before stays under it.
    doc["bans"] = {"threshold": 30, "window_seconds": 120, "ban_seconds": 600}
    small_stores(doc)
    # An anomaly rule that every announcement call matches, in alert mode, and an SDK minimum
    # the test's calls (which send no x-sdk-version) are flagged against: their metrics have data.
    doc["anomalies"] = {"working_hours": [{"id": "never", "timezone": "UTC", "days": ["sun"], "from": "00:00",
                                           "to": "00:01", "apis": ["info.announcements"], "action": "alert"}]}
    for app in doc["apps"]:
        if app["id"] == "demo-partner":
            app["sdk"] = {"minimum": "2.1.0", "action": "flag"}
    # One announcement a minute per source: the second is refused rate_limited (RL-1).
    doc["rate_limits"] = [{"id": "announcements", "by": ["source"], "apis": ["info.announcements"],
                           "per_minute": 1}]
    g = start_gateway(tmp_path_factory.mktemp("gw-mon"), doc, secret=secret, concurrency=2)
    yield g
    g.stop()


def test_labelled_metrics_read_back_from_prometheus(mgw, secret, tmp_path):  # MON-1, MON-2, MON-4, MON-8, MON-10, LVL-3
    c = Client(mgw, secret)
    # Allowed: S0 and S1, and an S3 order with a body (bytes in).
    assert c.get(QUOTE, headers={"x-app-id": "demo-partner"}).status_code == 200
    assert c.get("/api/v1/info/announcements", headers={"x-app-id": "demo-partner"}).status_code == 200
    limited = c.get("/api/v1/info/announcements", headers={"x-app-id": "demo-partner"})
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    for _ in range(2):
        assert c.send(c.sign("GET", RESEARCH)).status_code == 200
    body = b'{"symbol":"600000","side":"buy","qty":100}'
    order = c.send(c.sign("POST", "/api/v1/orders", body=body, keyid="demo-partner-p256"))
    assert order.status_code == 200, order.text
    # Refused: a valid key id with a wrong signature (the request changed after signing), MON-4.
    forged = c.sign("GET", "/api/v1/info/research/r-5")
    forged["url"] = forged["url"].replace("r-5", "r-6")
    r = c.send(forged)
    assert r.status_code == 401 and r.json()["error"] == "signature_invalid"
    # Twenty App_IDs the policy does not know: one label value, "unknown" (bounded cardinality).
    for i in range(20):
        r = c.get(QUOTE, headers={"x-app-id": f"stranger-{i}"})
        assert r.status_code == 401 and r.json()["error"] == "unknown_app"
    # A shadow API: a path outside the inventory, with the App_ID it claims (LVL-3, MON-1).
    shadow = c.get("/api/v1/internal/export-all", headers={"x-app-id": "demo-partner"})
    assert shadow.status_code == 403 and shadow.json()["error"] == "unknown_api"
    rec = read_audit(mgw, shadow.json()["request_id"])
    assert rec["audit"]["app"] == "demo-partner" and rec["upstream"] is None

    # Envoy's own Prometheus output, labels taken out of the stat names by stats_tags.
    time.sleep(1.5)  # the filter adds its counts to Envoy's once a second
    series = prometheus_series(mgw.admin("/stats/prometheus"))
    ok = 'apisec_requests_total{app="demo-partner",api="%s",level="%s",decision="allow",code="none"}'
    assert series[ok % ("market.quote", "S0")] == 1
    assert series[ok % ("info.research", "S1")] == 2
    assert series[ok % ("trade.order.place", "S3")] == 1
    deny = 'apisec_requests_total{app="%s",api="%s",level="%s",decision="deny",code="%s"}'
    assert series[deny % ("demo-partner", "info.research", "S1", "signature_invalid")] == 1
    assert series[deny % ("unknown", "market.quote", "S0", "unknown_app")] == 20
    assert not [k for k in series if "stranger" in k], "an unknown App_ID must not become a label value"
    assert series[deny % ("demo-partner", "none", "none", "unknown_api")] == 1
    assert series['apisec_shadow_calls_total{app="demo-partner"}'] == 1
    assert series['apisec_rate_limited_total{app="demo-partner",rule="announcements",action="refuse"}'] == 1
    assert series['apisec_request_bytes_total{app="demo-partner",api="trade.order.place"}'] == len(body)
    assert series['apisec_response_bytes_total{app="demo-partner",api="trade.order.place"}'] == len(order.content)
    # Histograms reach the admin output when Envoy merges them (its stats flush, every 5 s).
    count = 'apisec_request_duration_ms_count{app="demo-partner",api="info.research"}'
    deadline = time.time() + 15
    while series.get(count) != 3 and time.time() < deadline:
        time.sleep(1)
        series = prometheus_series(mgw.admin("/stats/prometheus"))
    assert series[count] == 3, "two allowed calls and the refused one"
    # Issue 26: the backend's own status per API (a 503 from the backend is not a success),
    # a blacklisted user's call counted by its code, and the SDK versions in use (MON-7).
    assert c.get(QUOTE + "?demo_status=503", headers={"x-app-id": "demo-partner"}).status_code == 503
    assert c.get(QUOTE + "?demo_status=404", headers={"x-app-id": "demo-partner"}).status_code == 404
    frozen = c.send(c.sign("GET", RESEARCH, extra=["--header", "x-user-id: u-frozen-0001", "--cover", "x-user-id"]))
    assert frozen.status_code == 403 and frozen.json()["error"] == "blacklisted"
    on_sdk = c.send(c.sign("GET", RESEARCH, extra=["--header", "x-sdk-version: 2.4.0", "--cover", "x-sdk-version"]))
    assert on_sdk.status_code == 200, on_sdk.text
    time.sleep(1.5)
    series = prometheus_series(mgw.admin("/stats/prometheus"))
    backend = 'apisec_backend_responses_total{app="demo-partner",api="%s",status="%s"}'
    assert series[backend % ("market.quote", "5xx")] == 1
    assert series[backend % ("market.quote", "4xx")] == 1
    assert series[backend % ("market.quote", "2xx")] == 1
    assert series[backend % ("info.research", "2xx")] == 3
    assert backend % ("info.research", "4xx") not in series, "the gateway's refusals are not the backend's"
    assert series[deny % ("demo-partner", "info.research", "S1", "blacklisted")] == 1
    assert series['apisec_sdk_calls_total{app="demo-partner",version="2.4.0"}'] == 1
    assert series['apisec_sdk_calls_total{app="demo-partner",version="none"}'] >= 5
    assert not [k for k in series if "apisec_sdk_calls_total" in k and 'app="unknown"' in k], \
        "an unknown App_ID's SDK is not counted"
    versions = [k for k, v in series.items() if k.startswith("apisec_policy_info{") and v == 1]
    assert len(versions) == 1 and re.fullmatch(r'apisec_policy_info\{version="[0-9a-f]{12}"\}', versions[0])
    # MON-8: the backend cluster is health-checked (the demo backend answers /healthz).
    assert series['envoy_cluster_health_check_success{envoy_cluster_name="backend"}'] >= 1
    assert series['envoy_cluster_membership_healthy{envoy_cluster_name="backend"}'] == 1
    assert 'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="backend"}' in series

    # Start a ban by source (MON-4): refusals without an App_ID count against 127.0.0.1.
    for _ in range(40):
        r = c.get(QUOTE)
        if r.json()["error"] == "banned":
            break
    assert r.status_code == 403 and r.json()["error"] == "banned"

    (tmp_path / "mtail").mkdir()
    mtail = Mtail(tmp_path / "mtail", mgw)
    prom = Prometheus(tmp_path, mgw.layout.admin_port, mtail=mtail.address)
    try:
        def read_back():
            got = prom.query('apisec_requests_total{app="demo-partner",api="info.research",decision="allow"}')
            return got if got and float(got[0]["value"][1]) == 3 else None  # two, and the SDK call
        deadline = time.time() + 60
        while not (got := read_back()) and time.time() < deadline:
            time.sleep(1)
        assert got, "Prometheus never read the filter's labelled counter"
        labels = got[0]["metric"]
        assert (labels["level"], labels["code"], labels["job"]) == ("S1", "none", "apisec-gateway")
        # One worker reads the store for the gauges, 12 keys a tick, 10 ticks a second (a pass
        # over this policy's 64 replay and 64 source slots takes ~1 s): the ban shows, and the
        # replay store.
        deadline = time.time() + 60
        while time.time() < deadline and not prom.query('apisec_bans_active{subject="ip"} == 1'):
            time.sleep(1)
        assert prom.query('apisec_bans_active{subject="ip"} == 1'), "the active ban gauge never showed the ban"
        cap = prom.query("apisec_replay_store_capacity")
        assert cap and float(cap[0]["value"][1]) > 0
        live = prom.query("apisec_replay_store_live")
        assert live and float(live[0]["value"][1]) >= 1, "the S1 and S3 nonces are live in the replay store"
        # A second shadow call, now that Prometheus has seen the counter's first value.
        # (from another source address: 127.0.0.1 is banned by now)
        again = c.raw("GET", c.http + "/api/v1/internal/export-all", [("x-app-id", "demo-partner")],
                      source="127.0.0.2")
        assert again.status_code == 403 and again.json()["error"] == "unknown_api"
        time.sleep(3)  # enough scrapes for rate() over 1m

        # Every query of the dashboard and the alert rules names metrics the gateway exports and
        # evaluates in this Prometheus; the dashboard's panels show data for this traffic.
        exported = prom.names()
        empty_ok = {"Reported (report mode) by code"}  # no rule runs in report mode here
        for title, expr in dashboard_queries():
            promql = grafana_to_promql(expr)
            missing = metric_names(promql) - exported
            assert not missing, f"dashboard panel {title!r} reads metrics nobody exports: {missing}"
            result = prom.query(promql)
            if title not in empty_ok:
                assert result, f"dashboard panel {title!r} shows nothing: {promql}"
        for alert, expr in alert_queries():
            missing = metric_names(expr) - exported
            assert not missing, f"alert {alert} reads metrics nobody exports: {missing}"
            prom.query(expr)
        # The rules are loaded, and the ones this traffic should fire are pending or firing.
        rules = requests.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert set(loaded) == {a for a, _ in alert_queries()}
        assert all(r["health"] == "ok" for r in loaded.values()), [r for r in loaded.values() if r["health"] != "ok"]
        deadline = time.time() + 20
        while time.time() < deadline:
            alerts = requests.get(prom.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            active = {a["labels"]["alertname"] for a in alerts}
            if {"ApisecShadowApiCalls", "ApisecBansActive"} <= active:
                break
            time.sleep(1)
        assert {"ApisecShadowApiCalls", "ApisecBansActive"} <= active, active
        assert "ApisecBackendUnhealthy" not in active
    finally:
        prom.stop()
        mtail.stop()


def test_one_policy_version_in_force_after_a_reload(tmp_path, secret):  # MON-2
    """Issue 21 item 9: on 91ff9c0 one Envoy exported apisec_policy_info at 1 for the old and
    the new version after one `apisec policy apply`, so ApisecPolicyVersionsDiffer paged. Now the
    old version goes to 0 in every VM (main thread and both workers), and the page stays quiet."""
    g = start_gateway(tmp_path, base_policy(), secret=secret, concurrency=2)
    try:
        def in_force() -> dict[str, float]:
            series = prometheus_series(g.admin("/stats/prometheus"))
            return {k: v for k, v in series.items() if k.startswith("apisec_policy_info{") and v == 1}

        first = in_force()
        assert len(first) == 1, first
        changed = base_policy()
        changed["gateway"]["max_body_bytes"] = 32 * 1024
        record = gw.apply_policy(json.dumps(changed), g.layout, actor="test", source="reload")
        assert record["outcome"] == "applied"
        # traffic on both workers after the reload
        c = Client(g, secret)
        for _ in range(6):
            assert c.get("/api/v1/market/quotes/600000", headers={"x-app-id": "demo-partner"}).status_code == 200
        time.sleep(1.5)
        second = in_force()
        assert len(second) == 1 and second != first, (first, second)
    finally:
        g.stop()


class Receiver:
    """The webhook end of monitoring/alertmanager.yml: an HTTP server that keeps each
    notification Alertmanager posts, by path (/apisec/page, /apisec/ticket)."""

    def __init__(self):
        import http.server
        import threading

        got: list[tuple[str, dict]] = []
        self.got = got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                got.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict]:
        return [a for p, doc in list(self.got) if p == path for a in doc["alerts"]]

    def stop(self):
        self.server.shutdown()


class Alertmanager:
    """A real Alertmanager (Debian's prometheus-alertmanager) with monitoring/alertmanager.yml,
    its webhooks pointed at `receiver` and its waits shortened for a test."""

    def __init__(self, tmp: Path, receiver: Receiver):
        conf = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
        for r in conf["receivers"]:
            for hook in r["webhook_configs"]:
                hook["url"] = hook["url"].replace("127.0.0.1:9095", f"127.0.0.1:{receiver.port}")
        for route in [conf["route"], *conf["route"]["routes"]]:
            route.update(group_wait="1s", group_interval="1s")
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(conf))
        self.port = gw.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc, self.log = serve(
            [tool("prometheus-alertmanager"), f"--config.file={tmp / 'alertmanager.yml'}",
             f"--storage.path={tmp / 'am'}", f"--web.listen-address={self.address}", "--cluster.listen-address="],
            tmp / "alertmanager.log", f"http://{self.address}")

    def stop(self):
        stop(self.proc, self.log)


def test_alertmanager_config_passes_amtool():  # MON-2
    out = subprocess.run([tool("amtool"), "check-config", "alertmanager.yml"], cwd=MONITORING,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_alerts_reach_the_receivers_by_severity(tmp_path, secret):  # MON-2, MON-4
    """Issue 26: alerts reached no one. A real Prometheus scrapes a real gateway with
    monitoring/prometheus.yml, evaluates monitoring/alerts.yml and sends to a real Alertmanager
    with monitoring/alertmanager.yml: forged signatures for a registered app page the on-call
    receiver (MON-4), and the ban they cause goes to the security team's ticket receiver."""
    doc = base_policy()
    doc["bans"] = {"threshold": 5, "window_seconds": 120, "ban_seconds": 600}
    small_stores(doc)
    g = start_gateway(tmp_path / "gw", doc, secret=secret, concurrency=1)
    receiver = Receiver()
    (tmp_path / "am").mkdir()
    am = Alertmanager(tmp_path / "am", receiver)
    (tmp_path / "prom").mkdir()
    prom = Prometheus(tmp_path / "prom", g.layout.admin_port, alertmanager=am.address)
    try:
        c = Client(g, secret)
        for i in range(6):  # a valid key id, signatures that do not verify
            forged = c.sign("GET", f"/api/v1/info/research/r-{i}")
            forged["url"] = forged["url"].replace(f"r-{i}", f"r-{i}x")
            assert c.send(forged).json()["error"] in ("signature_invalid", "banned")

        def delivered(path: str, name: str) -> list[dict]:
            return [a for a in receiver.alerts(path) if a["labels"]["alertname"] == name and a["status"] == "firing"]

        deadline = time.time() + 90
        while time.time() < deadline and not (delivered("/apisec/page", "ApisecSignatureFailuresForValidKey")
                                               and delivered("/apisec/ticket", "ApisecBansActive")):
            time.sleep(1)
        page = delivered("/apisec/page", "ApisecSignatureFailuresForValidKey")
        assert page, f"no page reached the on-call receiver: {receiver.got}"
        assert page[0]["labels"]["app"] == "demo-partner" and page[0]["labels"]["severity"] == "page"
        assert "failed signatures" in page[0]["annotations"]["summary"]
        ticket = delivered("/apisec/ticket", "ApisecBansActive")
        assert ticket and ticket[0]["labels"]["severity"] == "ticket", receiver.got
        # routed by severity: no page went to the ticket queue, no ticket to on-call
        assert all(a["labels"]["severity"] == "page" for a in receiver.alerts("/apisec/page"))
        assert all(a["labels"]["severity"] == "ticket" for a in receiver.alerts("/apisec/ticket"))
    finally:
        prom.stop()
        am.stop()
        receiver.stop()
        g.stop()


def test_a_backend_fault_is_detected_and_service_recovers_by_itself(tmp_path, secret):  # MON-8, MON-10, MON-11
    """The backend stops: calls are answered 503 and counted as the backend's 5xx (not as a
    gateway refusal), the health check marks it unhealthy; it comes back: the health check and
    the calls recover with nothing restarted."""
    import sys

    from helpers import wait_for

    g = start_gateway(tmp_path, base_policy(), secret=secret, concurrency=1)
    try:
        c = Client(g, secret)

        def quote() -> int:
            return c.get(QUOTE, headers={"x-app-id": "demo-partner"}).status_code

        def stat(name: str) -> float | None:
            return prometheus_series(g.admin("/stats/prometheus")).get(name)

        healthy = 'envoy_cluster_membership_healthy{envoy_cluster_name="backend"}'
        assert quote() == 200 and stat(healthy) == 1
        g.upstream.terminate()
        g.upstream.wait(timeout=10)
        assert quote() == 503
        wait_for(lambda: stat(healthy) == 0, timeout=30, what="the health check to find the backend down")
        time.sleep(1.5)
        fives = 'apisec_backend_responses_total{app="demo-partner",api="market.quote",status="5xx"}'
        assert stat(fives) >= 1, "Envoy's 503 for a backend it could not reach counts as the backend's"
        assert not [k for k, v in prometheus_series(g.admin("/stats/prometheus")).items()
                    if k.startswith("apisec_requests_total{") and 'decision="deny"' in k and v > 0], \
            "the outage is not a gateway refusal"
        g.upstream = subprocess.Popen([sys.executable, str(ROOT / "envoy/demo_upstream.py"), "--port",
                                       str(g.layout.upstream_port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        wait_for(lambda: stat(healthy) == 1, timeout=30, what="the health check to find the backend back")
        wait_for(lambda: quote() == 200, timeout=30, what="calls to succeed again")
        assert g.envoy.poll() is None
    finally:
        g.stop()


def test_alerts_from_log_analysis_reach_the_receivers(tmp_path, secret):  # MON-9
    """Issue 26, MON-9: mtail reads a real gateway's audit log and Envoy's log
    (monitoring/apisec.mtail), a real Prometheus scrapes it and evaluates the apisec-logs rules,
    a real Alertmanager routes them: a line written into the audit log by someone other than the
    gateway pages on-call; a policy Envoy refuses (an error in Envoy's log) opens a ticket.
    Sealed records and checkpoints are counted and raise nothing."""
    doc = base_policy()
    doc["audit"]["checkpoint_seconds"] = 1
    g = start_gateway(tmp_path / "gw", doc, secret=secret, concurrency=1)
    receiver = Receiver()
    for d in ("am", "prom", "mtail"):
        (tmp_path / d).mkdir()
    am = Alertmanager(tmp_path / "am", receiver)
    mtail = Mtail(tmp_path / "mtail", g)
    prom = Prometheus(tmp_path / "prom", g.layout.admin_port, alertmanager=am.address, mtail=mtail.address)
    try:
        c = Client(g, secret)
        for _ in range(3):
            assert c.send(c.sign("GET", RESEARCH)).status_code == 200

        def value(expr: str) -> float:
            got = prom.query(expr)
            return float(got[0]["value"][1]) if got else 0.0

        deadline = time.time() + 30
        while time.time() < deadline and not (value("apisec_log_sealed_lines_total") >= 3
                                               and value("apisec_log_checkpoints_total") >= 1):
            time.sleep(1)
        assert value("apisec_log_sealed_lines_total") >= 3 and value("apisec_log_checkpoints_total") >= 1
        assert value("apisec_log_unsealed_lines_total") == 0
        assert not receiver.got, "sealed records and checkpoints raised an alert"

        # someone appends a record of their own to the audit log
        with open(g.layout.audit_log, "a") as f:
            f.write('{"ts":1796000000,"request_id":"inserted","decision":"allow","status":200}\n')
        # a policy Envoy refuses: the filter logs the error, the last good policy stays
        broken = json.loads(json.dumps(doc))
        broken["grants"].append({"id": "g-nobody", "app": "nobody", "apis": ["info.research"]})
        gw.write_ecds(json.dumps(broken), g.layout)

        def delivered(path: str, name: str) -> list[dict]:
            return [a for a in receiver.alerts(path) if a["labels"]["alertname"] == name and a["status"] == "firing"]

        deadline = time.time() + 90
        while time.time() < deadline and not (delivered("/apisec/page", "ApisecAuditLogUnsealedLine")
                                               and delivered("/apisec/ticket", "ApisecGatewayErrorsLogged")):
            time.sleep(1)
        page = delivered("/apisec/page", "ApisecAuditLogUnsealedLine")
        assert page and page[0]["labels"]["severity"] == "page", receiver.got
        assert "did not seal" in page[0]["annotations"]["summary"]
        ticket = delivered("/apisec/ticket", "ApisecGatewayErrorsLogged")
        # Envoy logs the filter's refusal under its component: wasm, or dynamic_modules (native build)
        component = "wasm" if g.layout.native is None else "dynamic_modules"
        assert ticket and ticket[0]["labels"]["component"] == component, receiver.got
        assert c.send(c.sign("GET", RESEARCH)).status_code == 200, "the last good policy stays in force"
    finally:
        prom.stop()
        mtail.stop()
        am.stop()
        receiver.stop()
        g.stop()
