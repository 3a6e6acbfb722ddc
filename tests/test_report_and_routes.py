"""Report-only mode (dry run) and per-route policy by Envoy route name, in a real Envoy: the
route name the filter reads is the `name` of the route in the route configuration (issue 11).
Every refused case checks status, code, audit record and that the upstream got nothing; every
reported case checks that the upstream got the request without a verified identity, the
audit record says `report` with the code, and apisec_requests_total{decision="report"} counts it."""
from __future__ import annotations

import json

import pytest
import requests

from conftest import base_policy, decided, gw, read_audit, start_gateway

VHOSTS = {"partners.example.com": "partners", "shadow.example.com": "shadow", "other.example.com": "unlisted"}


def named_routes(doc: dict) -> None:
    """Three more virtual hosts in front of the checked-in one, each with one named route."""
    for lst in doc["static_resources"]["listeners"]:
        rc = gw._hcm(lst)["route_config"]
        default = rc["virtual_hosts"][0]
        extra = []
        for domain, route in VHOSTS.items():
            vh = json.loads(json.dumps(default))
            vh["name"] = route
            vh["domains"] = [domain, f"{domain}:*"]
            vh["routes"][0]["name"] = route
            extra.append(vh)
        rc["virtual_hosts"] = extra + [default]


@pytest.fixture(scope="module")
def routed(tmp_path_factory, secret):
    policy = base_policy()
    policy["routes"] = [
        {"name": "apis"},
        {"name": "partners", "apis": ["market.quote", "info.research"]},
        {"name": "shadow", "apis": ["market.quote", "info.research"], "mode": "report"},
    ]
    g = start_gateway(tmp_path_factory.mktemp("gw-routes"), policy, secret=secret, concurrency=1,
                      bootstrap_hook=named_routes)
    yield g
    g.stop()


def call(g, host: str | None, path: str, app: str):
    s = requests.Session()
    s.trust_env = False
    headers = {"x-app-id": app}
    if host:
        headers["host"] = host
    return s.get(f"http://127.0.0.1:{g.layout.http_port}{path}", headers=headers, timeout=10)


def upstream(g) -> int:
    return g.stat("cluster.backend.upstream_rq_total")


def test_route_narrows_what_is_served(routed):
    g = routed
    ok = call(g, "partners.example.com", "/api/v1/market/quotes/600000", "demo-partner")
    assert ok.status_code == 200 and ok.json()["headers"]["x-apisec-app"] == "demo-partner"
    before = upstream(g)
    for host, path in [("partners.example.com", "/api/v1/accounts/8800123/balance"),
                       ("other.example.com", "/api/v1/market/quotes/600000")]:
        r = call(g, host, path, "demo-partner")
        assert r.status_code == 403 and r.json()["error"] == "route_not_allowed", (host, r.text)
        rec = read_audit(g, r.json()["request_id"])["audit"]
        assert rec["code"] == "route_not_allowed" and rec["decision"] == "deny"
    assert upstream(g) == before
    # The default route (named `apis` in envoy/gateway.yaml) serves everything the policy has.
    assert call(g, None, "/api/v1/market/quotes/600000", "demo-partner").status_code == 200


def test_report_route_lets_a_would_be_refusal_through_and_records_it(routed):
    g = routed
    before = upstream(g)
    refused = call(g, "partners.example.com", "/api/v1/market/quotes/600000", "nobody")
    assert refused.status_code == 401 and refused.json()["error"] == "unknown_app"
    assert upstream(g) == before
    reported_before = decided(g, "report", "unknown_app")
    r = call(g, "shadow.example.com", "/api/v1/market/quotes/600000", "nobody")
    assert r.status_code == 200
    echoed = r.json()
    assert upstream(g) == before + 1
    # Nothing was verified: no identity headers go upstream (and a client's own are stripped).
    assert not any(k.startswith("x-apisec-") for k in echoed["headers"])
    rec = read_audit(g, echoed["headers"]["x-request-id"])["audit"]
    # The record names the refusal it would have been; its status is what the client got.
    assert rec["decision"] == "report" and rec["code"] == "unknown_app" and rec["status"] == 200
    assert decided(g, "report", "unknown_app") == reported_before + 1


def test_report_route_never_reports_a_routing_override(routed):
    g = routed
    s = requests.Session()
    s.trust_env = False
    before = upstream(g)
    r = s.get(f"http://127.0.0.1:{g.layout.http_port}/api/v1/market/quotes/600000?_method=DELETE",
              headers={"x-app-id": "demo-partner", "host": "shadow.example.com"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "override_not_allowed"
    assert read_audit(g, r.json()["request_id"])["audit"]["decision"] == "deny"
    assert upstream(g) == before


def test_report_mode_for_one_api(tmp_path, secret):
    policy = base_policy()
    next(a for a in policy["apis"] if a["id"] == "info.research")["mode"] = "report"
    g = start_gateway(tmp_path, policy, secret=secret, concurrency=1)
    try:
        s = requests.Session()
        s.verify = str(g.layout.certs / "ca.pem")
        s.trust_env = False
        https = f"https://127.0.0.1:{g.layout.https_port}"
        # No signature at S1: reported, let through.
        r = s.get(f"{https}/api/v1/info/research/r-1", headers={"x-app-id": "demo-partner"}, timeout=10)
        assert r.status_code == 200
        rec = read_audit(g, r.json()["headers"]["x-request-id"])["audit"]
        assert rec["decision"] == "report" and rec["code"] == "signature_missing"
        # Another API of the same policy stays enforced.
        before = upstream(g)
        r = s.get(f"{https}/api/v1/accounts/8800123/balance", headers={"x-app-id": "demo-partner"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "signature_missing"
        assert read_audit(g, r.json()["request_id"])["audit"]["decision"] == "deny"
        assert upstream(g) == before
    finally:
        g.stop()


def test_report_mode_hides_what_any_grant_hides_and_drops_unverified_users(tmp_path, secret):  # PERM-1, LOG-4
    """Issue 21 item 3: an S2 personal_info API in report mode, called over plain HTTP with no
    credential by an unknown App_ID naming a user. On 91ff9c0 the caller got id_number, mobile,
    MOBILE and owner.mobile, and the backend got the client's x-user-id. Now the response hides
    what any grant of the API hides, and the unverified user header is dropped."""
    policy = base_policy()
    next(a for a in policy["apis"] if a["id"] == "account.positions")["mode"] = "report"
    g = start_gateway(tmp_path, policy, secret=secret, concurrency=1, with_tls=False)
    try:
        s = requests.Session()
        s.trust_env = False
        r = s.get(f"http://127.0.0.1:{g.layout.http_port}/api/v1/accounts/8800123/positions",
                  headers={"x-app-id": "nobody", "x-user-id": "u-victim"}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        for hidden in ("id_number", "mobile", "MOBILE"):
            assert hidden not in body, body
        # owner.mobile is not hidden by the example's grant (top-level paths), for a granted
        # caller either: report mode shows no more than a grant does
        assert body["owner"]["name"] == "Zhang San"
        assert body["balance"] == "102400.50", "every other field passes"
        assert "x-user-id" not in body["headers"], "the backend got the unverified user"
        assert not any(k.startswith("x-apisec-") for k in body["headers"])
        rec = read_audit(g, body["headers"]["x-request-id"])["audit"]
        assert rec["decision"] == "report"
    finally:
        g.stop()


def test_report_mode_on_an_s3_api_without_the_flag_is_refused_by_apply(tmp_path, secret):
    policy = base_policy()
    next(a for a in policy["apis"] if a["id"] == "trade.order.place")["mode"] = "report"
    with pytest.raises(gw.PolicyRejected, match="report_only_s3"):
        gw.render(json.dumps(policy), gw.Layout(build=tmp_path, wasm=gw.ROOT / gw.REL_WASM))
