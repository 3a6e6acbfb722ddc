"""Anomaly rules and SDK versions (issue 13; MON-3; SDK versions MON-7, ATK-2) against a real Envoy: each rule
in alert mode (the call goes on, the audit record names the rule, the metric counts it) and in
block mode (403 anomaly_blocked, audit record, nothing upstream), with a call the rule leaves
alone; SDK versions below the minimum, known bad or missing refused (`sdk_outdated`) or flagged
on the answer (`x-apisec-sdk`), and counted."""
from __future__ import annotations

import datetime

import pytest

from conftest import Client, base_policy, read_audit, start_gateway
from helpers import assert_refused, metric

QUOTE = "/api/v1/market/quotes/600000"  # S0
ANNOUNCEMENTS = "/api/v1/info/announcements"  # S0
RESEARCH = "/api/v1/info/research/r-2026-001"  # S1, signed
GOOD_SDK = ("x-sdk-version", "2.2.0")


def hhmm(t: datetime.datetime) -> str:
    return t.strftime("%H:%M")


def windows() -> tuple[dict, dict]:
    """A working window around now and one that excludes now, in +08:00, every day: the tests
    run at any hour."""
    now = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=8)))
    around = {"from": hhmm(now - datetime.timedelta(hours=2)), "to": hhmm(now + datetime.timedelta(hours=2))}
    away = {"from": hhmm(now + datetime.timedelta(hours=10)), "to": hhmm(now + datetime.timedelta(hours=11))}
    return around, away


@pytest.fixture(scope="module")
def agw(tmp_path_factory, secret):
    doc = base_policy()
    around, away = windows()
    every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    doc["anomalies"] = {
        "working_hours": [
            {"id": "research-hours", "timezone": "+08:00", "days": every_day, **away, "apis": ["info.research"],
             "action": "block"},
            {"id": "announcement-hours", "timezone": "+08:00", "days": every_day, **away,
             "apis": ["info.announcements"], "action": "alert"},
            {"id": "quote-hours", "timezone": "+08:00", "days": every_day, **around, "apis": ["market.quote"],
             "action": "block"},
        ],
        "usual_sources": [
            {"id": "desk-sources", "app": "demo-desk", "ranges": ["127.0.0.1/32"], "action": "block"},
            {"id": "partner-sources", "app": "demo-partner", "ranges": ["127.0.0.1/32"], "action": "alert"},
        ],
    }
    for app in doc["apps"]:
        if app["id"] == "demo-partner":
            app["sdk"] = {"minimum": "2.1.0", "known_bad": ["2.3.1"], "action": "refuse"}
        if app["id"] == "demo-desk":
            app["sdk"] = {"minimum": "2.1.0", "action": "flag"}
    g = start_gateway(tmp_path_factory.mktemp("gw-anomalies"), doc, secret=secret)
    yield g
    g.stop()


def get(c: Client, path: str, app: str, sdk: tuple[str, str] | None = GOOD_SDK, source: str | None = None):
    headers = [("x-app-id", app)] + ([sdk] if sdk else [])
    return c.raw("GET", c.http + path, headers, source=source)


def allowed_record(g, r) -> dict:
    assert r.status_code == 200, r.text
    rec = read_audit(g, r.json()["headers"]["x-request-id"])
    assert rec["upstream"] is not None and rec["audit"]["decision"] == "allow"
    return rec["audit"]


def test_working_hours_alert_and_block(agw, secret):  # MON-3
    c = Client(agw, secret)
    # inside its window: no anomaly, although the rule blocks
    rec = allowed_record(agw, get(c, QUOTE, "demo-partner"))
    assert "anomalies" not in rec
    # outside, alert: the call goes on, the record names the rule
    rec = allowed_record(agw, get(c, ANNOUNCEMENTS, "demo-partner"))
    assert rec["anomalies"] == [{"rule": "announcement-hours", "kind": "working_hours", "action": "alert"}]
    # outside, block: refused with the rule in the record, nothing upstream
    signed = c.sign("GET", RESEARCH)
    r = c.send(signed, headers=[*signed["headers"].items(), GOOD_SDK])
    audit = assert_refused(agw, r, 403, "anomaly_blocked")
    assert audit["anomalies"] == [{"rule": "research-hours", "kind": "working_hours", "action": "block"}]
    assert "research-hours" in audit["detail"]
    anomalies = "apisec_anomalies_total"
    assert metric(agw, anomalies, app="demo-partner", rule="announcement-hours", action="alert") == 1
    assert metric(agw, anomalies, app="demo-partner", rule="research-hours", action="block") == 1


def test_usual_sources_alert_and_block(agw, secret):  # MON-3
    c = Client(agw, secret)
    # from its usual range: nothing
    rec = allowed_record(agw, get(c, QUOTE, "demo-partner", source="127.0.0.1"))
    assert "anomalies" not in rec
    # from elsewhere, alert
    rec = allowed_record(agw, get(c, QUOTE, "demo-partner", source="127.0.0.2"))
    assert rec["anomalies"] == [{"rule": "partner-sources", "kind": "usual_sources", "action": "alert"}]
    assert rec["client_ip"] == "127.0.0.2"
    # from elsewhere, block
    r = get(c, QUOTE, "demo-desk", source="127.0.0.3")
    audit = assert_refused(agw, r, 403, "anomaly_blocked")
    assert audit["anomalies"] == [{"rule": "desk-sources", "kind": "usual_sources", "action": "block"}]
    rec = allowed_record(agw, get(c, QUOTE, "demo-desk", source="127.0.0.1"))
    assert "anomalies" not in rec
    assert metric(agw, "apisec_anomalies_total", app="demo-desk", rule="desk-sources", action="block") == 1


def test_sdk_versions_refused_or_flagged(agw, secret):  # MON-7, ATK-2
    c = Client(agw, secret)
    ok = get(c, QUOTE, "demo-partner", sdk=("x-sdk-version", "2.10.1"))
    assert ok.status_code == 200 and "x-apisec-sdk" not in ok.headers
    assert "sdk" not in allowed_record(agw, ok)
    for sdk, status in [(("x-sdk-version", "2.0.9"), "below_minimum"), (("x-sdk-version", "2.3.1"), "known_bad"),
                        (None, "missing"), (("x-sdk-version", "latest"), "malformed")]:
        audit = assert_refused(agw, get(c, QUOTE, "demo-partner", sdk=sdk), 403, "sdk_outdated")
        assert audit["sdk"]["status"] == status and audit["sdk"]["action"] == "refuse"
        assert audit["sdk"].get("version") == (sdk[1] if sdk else None)
    # flagged: the call goes on and its answer says why
    r = get(c, QUOTE, "demo-desk", sdk=("x-sdk-version", "1.9"))
    assert r.status_code == 200 and r.headers["x-apisec-sdk"] == "below_minimum; minimum=2.1.0"
    assert allowed_record(agw, r)["sdk"] == {"version": "1.9", "status": "below_minimum", "action": "flag"}
    assert get(c, QUOTE, "demo-desk", sdk=("x-sdk-version", "2.1.0")).headers.get("x-apisec-sdk") is None
    name = "apisec_sdk_outdated_total"
    assert metric(agw, name, app="demo-partner", status="known_bad", action="refuse") == 1
    assert metric(agw, name, app="demo-desk", status="below_minimum", action="flag") == 1
